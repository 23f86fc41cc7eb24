"""Sharing weights: checkpoint.py exports a checkpoint's EMA weights and config to .safetensors, byte for byte in
the layout of the safetensors package (checked against a file that package wrote), and every loader takes the
export as it takes the checkpoint."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoint
import sample
import train
from checkpoint import load_checkpoint, load_model, read_safetensors, write_safetensors
from testdata.make_safetensors_fixture import METADATA, tensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, "tests", "testdata", "reference.safetensors")
TINY = ["--data=shapes", "--model=SiT-S/4", "--depth=2", "--hidden-size=32", "--num-heads=2", "--image-size=8",
        "--routing=dynamic", "--chunk=2", "--precision=fp32", "--global-batch-size=4", "--log-every=1",
        "--eval-every=0", "--sample-every=0", "--ckpt-every=3", "--max-steps=3"]


def test_safetensors_read_and_written_as_the_safetensors_package_does(tmp_path):
    state, metadata = read_safetensors(REFERENCE)
    assert metadata == METADATA
    expected = tensors()
    assert sorted(state) == sorted(expected)
    for k, v in expected.items():
        assert state[k].dtype == torch.from_numpy(v).dtype and np.array_equal(state[k].numpy(), v), k
    write_safetensors({k: torch.from_numpy(v) for k, v in expected.items()}, str(tmp_path / "ours.safetensors"),
                      METADATA)
    ours, theirs = (tmp_path / "ours.safetensors").read_bytes(), open(REFERENCE, "rb").read()
    n = [int.from_bytes(f[:8], "little") for f in (ours, theirs)]
    assert n[0] == n[1] and n[0] % 8 == 0 and ours[8 + n[0]:] == theirs[8 + n[1]:]  # the data, 132 bytes
    head = [json.loads(f[8:8 + k], object_pairs_hook=list) for f, k in zip((ours, theirs), n)]
    assert [entry for entry in head[0] if entry[0] != "__metadata__"] == \
        [entry for entry in head[1] if entry[0] != "__metadata__"]  # tensor entries and their order alike


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    train.main(train.parse_args([*TINY, f"--results-dir={root / 'run'}"]))
    ckpt, out = str(root / "run" / "checkpoints" / "0000003.pt"), str(root / "sit.safetensors")
    said = subprocess.run([sys.executable, "checkpoint.py", ckpt, out], cwd=ROOT, capture_output=True, text=True)
    assert said.returncode == 0 and f"in {out}" in said.stdout, said.stderr
    return root, ckpt, out


def test_an_export_holds_the_ema_weights_and_loads_as_the_checkpoint(exported):
    root, ckpt, out = exported
    state, metadata = read_safetensors(out)
    checkpoint = load_checkpoint(ckpt)
    assert metadata["weights"] == "ema" and metadata["step"] == "3" and "opt" not in state
    assert all(torch.equal(state[k], v) for k, v in checkpoint["ema"].items()) and len(state) == len(checkpoint["ema"])
    ours, theirs = load_model(out), load_model(ckpt)
    assert ours.config == theirs.config
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 3])
    assert torch.equal(ours(x, t, y), theirs(x, t, y))


def test_sample_and_init_from_take_an_export(exported, tmp_path):
    root, ckpt, out = exported
    for source in (ckpt, out):
        grid = tmp_path / f"{os.path.basename(source)}.png"
        sample.main(sample.parse_args([f"--ckpt={source}", f"--out={grid}", "--num-steps=2", "--per-class=1",
                                       "--classes", "0", "1", "--no-tf32"]))  # leaves TF32 as other tests expect
    assert (tmp_path / "sit.safetensors.png").read_bytes() == (tmp_path / "0000003.pt.png").read_bytes()
    train.main(train.parse_args([*TINY, "--max-steps=1", f"--init-from={out}", f"--results-dir={tmp_path / 'ft'}",
                                 "--lr=1e-12"]))
    started = load_checkpoint(str(tmp_path / "ft" / "checkpoints" / "0000001.pt"))["model"]
    ema = load_checkpoint(ckpt)["ema"]
    assert all(torch.allclose(started[k], ema[k], atol=1e-9) for k in ema)  # one step at lr 1e-12: the export


def test_export_refuses_a_bare_state_dict_and_another_suffix(exported, tmp_path, capsys):
    root, ckpt, out = exported
    torch.save(load_checkpoint(ckpt)["ema"], tmp_path / "bare.pt")
    for argv, message in (([str(tmp_path / "bare.pt"), str(tmp_path / "x.safetensors")], "no config"),
                          ([ckpt, str(tmp_path / "x.pt")], "give a name ending in .safetensors"),
                          ([str(tmp_path / "missing.pt"), str(tmp_path / "x.safetensors")], "no such file")):
        with pytest.raises(SystemExit) as stop:
            checkpoint.main(argv)
        assert message in str(stop.value) + capsys.readouterr().err
        assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "x.pt").exists()
