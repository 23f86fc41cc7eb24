"""Bad input and faults, as a new user meets them: each case asserts the message a user sees and that no file
that existed before changed (nothing already written is lost). Tiny models and the toy data, on the CPU."""
import argparse
import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import diagnose
import fid
import prepare_imagenet
import sample
import toy_accuracy
import train
from checkpoint import load_checkpoint, resolve, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, where the scripts are
TINY = ["--model=SiT-S/4", "--depth=2", "--hidden-size=32", "--num-heads=2", "--precision=fp32", "--lr=1e-3",
        "--image-size=16"]


def run_train(tmp_path, *extra, name="run", steps=3):
    args = train.parse_args(["--data=shapes", *TINY, "--global-batch-size=4", f"--max-steps={steps}",
                             "--log-every=1", "--eval-every=0", "--sample-every=0", "--ckpt-every=3",
                             f"--results-dir={tmp_path / name}", *extra])
    train.main(args)


def files(root):
    """{relative path: sha256} of every file under root (nothing, if root does not exist)."""
    return {os.path.relpath(os.path.join(d, f), root): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, names in os.walk(root) for f in names}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 3-step run: results/run/checkpoints/0000003.pt, args.json, log.jsonl."""
    root = tmp_path_factory.mktemp("faults")
    run_train(root)
    return root


@pytest.fixture
def bad_files(tmp_path):
    """An empty file, random bytes, and files of the wrong kind, under names a user would give them."""
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    torch.save({"weight": torch.zeros(3)}, tmp_path / "tensors.pt")
    torch.save({"size": 16, "state": {}}, tmp_path / "classifier.pt")
    return tmp_path


def assert_refused(fn, message, *roots, capsys=None):
    """fn() stops with `message` (an exit, a ValueError or an argparse error) and leaves every file under roots
    as it was."""
    before = [files(r) for r in roots]
    with pytest.raises((SystemExit, ValueError, FileNotFoundError)) as stop:
        fn()
    said = str(stop.value) + (capsys.readouterr().err if capsys else "")
    assert message in said, said
    assert [files(r) for r in roots] == before


#################################################################################
#                      train.py: flags, checked before anything                 #
#################################################################################

@pytest.mark.parametrize("flag, message", [
    ("--global-batch-size=0", "--global-batch-size must be at least 1"),
    ("--global-batch-size=-8", "--global-batch-size must be at least 1"),
    ("--micro-batch-size=0", "--micro-batch-size must be at least 1"),
    ("--log-every=0", "--log-every must be at least 1"),
    ("--ckpt-every=0", "--ckpt-every must be at least 1"),
    ("--max-steps=0", "--max-steps must be at least 1"),
    ("--eval-samples=0", "--eval-samples must be at least 1"),
    ("--eval-every=-1", "--eval-every must be at least 0"),
    ("--sample-every=-5", "--sample-every must be at least 0"),
    ("--chunk=0", "--chunk must be at least 1"),
    ("--depth=0", "--depth must be at least 1"),
    ("--hidden-size=0", "--hidden-size must be at least 1"),
    ("--num-heads=0", "--num-heads must be at least 1"),
    ("--image-size=0", "--image-size must be at least 1"),
    ("--lr=0", "--lr must be above 0"),
    ("--lr=-1e-4", "--lr must be above 0"),
    ("--ema-decay=1.5", "--ema-decay must be in [0.0, 1.0]"),
    ("--grad-clip=-1", "--grad-clip must be at least 0.0"),
    ("--repa-coeff=-0.5", "--repa-coeff must be at least 0.0"),
    ("--repa-depth=0", "--repa-depth must be at least 1"),
    ("--sample-cfg=-2", "--sample-cfg must be at least 0.0"),
    ("--sample-steps=0", "--sample-steps must be at least 1"),
    ("--init-from=missing.pt", "--init-from missing.pt: no such file or directory"),
    ("--vae=missing/vae.safetensors", "--vae missing/vae.safetensors: no such file or directory"),
    ("--repa-encoder=missing.pth", "--repa-encoder missing.pth: no such file or directory"),
    ("--warmup-steps=-1", "--warmup-steps must be at least 0"),
    ("--class-dropout=1.5", "--class-dropout must be in [0.0, 1.0]"),
    ("--weight-decay=-0.1", "--weight-decay must be at least 0.0"),
    ("--adam-betas 0.9 1.0", "--adam-betas 0.9 1.0: each must lie in [0, 1)"),
    ("--t-sampling=lognormal --t-lognormal 0 0", "--t-lognormal's S is 0.0: it is a standard deviation"),
])
def test_bad_counts_are_refused_before_anything_is_created(tmp_path, capsys, flag, message):
    assert_refused(lambda: run_train(tmp_path, *flag.split(" ")), message, tmp_path, capsys=capsys)
    assert not (tmp_path / "run").exists()


def test_a_results_dir_that_cannot_be_made_is_refused_before_anything(tmp_path, capsys):
    (tmp_path / "file").write_text("a file, not a folder")
    assert_refused(lambda: run_train(tmp_path, f"--results-dir={tmp_path / 'file' / 'run'}"),
                   "is not a directory this user can write to", tmp_path, capsys=capsys)


#################################################################################
#             The other scripts: impossible values, missing files               #
#################################################################################

SCRIPTS = {"sample": sample.parse_args, "diagnose": diagnose.parse_args, "prepare": prepare_imagenet.parse_args,
           "fid": fid.main, "toy_accuracy": toy_accuracy.main}


@pytest.mark.parametrize("script, argv, message", [
    ("sample", ["--ckpt=CKPT", "--out=x.png", "--num-steps=0"], "--num-steps must be at least 1"),
    ("sample", ["--ckpt=CKPT", "--out=x.png", "--per-class=0"], "--per-class must be at least 1"),
    ("sample", ["--ckpt=CKPT", "--out=x.npz", "--num-fid-samples=8", "--batch-size=0"],
     "--batch-size must be at least 1"),
    ("sample", ["--ckpt=CKPT", "--out=x.png", "--cfg-scale=-1"], "--cfg-scale must be at least 0.0"),
    ("sample", ["--ckpt=CKPT", "--out=x.png", "--guidance-interval", "0.8", "0.2"],
     "--guidance-interval must be LOW HIGH with 0 <= LOW <= HIGH <= 1"),
    ("sample", ["--ckpt=missing.pt", "--out=x.png"], "--ckpt missing.pt: no such file or directory"),
    ("sample", ["--ckpt=CKPT", "--out=FILE/x.png"], "is not a directory this user can write to"),
    ("sample", ["--ckpt=CKPT", "--out=x.npz", "--num-fid-samples=0"], "--num-fid-samples needs a positive count"),
    ("diagnose", ["--ckpt=CKPT", "--num-samples=1"], "--num-samples must be at least 2"),
    ("diagnose", ["--ckpt=CKPT", "--map-steps=1"], "--map-steps must be at least 2"),
    ("diagnose", ["--ckpt=CKPT", "--probe-pairs=2"], "--probe-pairs must be at least 4"),
    ("diagnose", ["--ckpt=CKPT", "--t", "0.5", "1.5"], "--t values must lie in [0, 1]"),
    ("diagnose", ["--ckpt=missing.pt"], "--ckpt missing.pt: no such checkpoint file"),
    ("diagnose", ["--ckpt=CKPT", "--out=FILE/diag"], "is not a directory this user can write to"),
    ("diagnose", ["--log=missing/log.jsonl"], "--log missing/log.jsonl: no such file or directory"),
    ("diagnose", ["--log=FILE", "--out=OUT"], "with --log, --out is the figure to write: give a name ending in .png"),
    ("diagnose", ["--log=FILE", "--ckpt=CKPT"], "give --log (a run's curves) or --ckpt"),
    ("diagnose", [], "give one or more --ckpt (or --log"),
    ("prepare", ["--data-path=DIR", "--out=OUT", "--shard-size=0"], "--shard-size must be at least 1"),
    ("prepare", ["--data-path=DIR", "--out=OUT", "--batch-size=0"], "--batch-size must be at least 1"),
    ("prepare", ["--data-path=DIR", "--out=OUT", "--workers=-1"], "--workers must be at least 0"),
    ("prepare", ["--data-path=DIR", "--out=OUT", "--image-size=100"], "--image-size must be a multiple of 8"),
    ("prepare", ["--data-path=missing", "--out=OUT"], "--data-path missing: no such file or directory"),
    ("prepare", ["--data-path=DIR", "--out=OUT", "--vae=missing.bin"], "--vae missing.bin: no such file"),
    ("prepare", ["--data-path=DIR", "--out=FILE/out"], "is not a directory this user can write to"),
    ("fid", ["a.npz", "b.npz", "--batch-size=0"], "--batch-size must be at least 1"),
    ("fid", ["a.npz", "b.npz", "--inception=missing.pth"], "--inception missing.pth: no such file"),
    ("fid", ["--make-ref=shapes", "--num=0", "ref.npz"], "--num must be at least 1"),
    ("fid", ["a.npz", "b.npz", "--json=FILE/m.json"], "is not a directory this user can write to"),
    ("toy_accuracy", ["--ckpt=CKPT", "--per-class=0"], "--per-class must be at least 1"),
    ("toy_accuracy", ["--ckpt=CKPT", "--num-steps=0"], "--num-steps must be at least 1"),
    ("toy_accuracy", ["--ckpt=missing.pt"], "--ckpt missing.pt: no such file or directory"),
])
def test_every_script_refuses_impossible_values_before_any_work(run_dir, tmp_path, capsys, monkeypatch, script, argv,
                                                                message):
    (tmp_path / "FILE").write_text("a file, not a folder")
    (tmp_path / "DIR").mkdir()
    fill = {"CKPT": str(run_dir / "run" / "checkpoints" / "0000003.pt"), "FILE": str(tmp_path / "FILE"),
            "DIR": str(tmp_path / "DIR"), "OUT": str(tmp_path / "out")}
    argv = [next((a.replace(k, v) for k, v in fill.items() if k in a), a) for a in argv]
    monkeypatch.chdir(tmp_path)  # relative outputs would land here, where the check that nothing changed looks
    assert_refused(lambda: SCRIPTS[script](argv), message, tmp_path, run_dir, capsys=capsys)


@pytest.mark.parametrize("name", ["shapes", "random"])
def test_a_data_path_that_names_a_built_in_set_is_refused(tmp_path, capsys, name):
    args = ["--data-path=" + name, *TINY, f"--results-dir={tmp_path / 'run'}"]
    assert_refused(lambda: train.parse_args(args), f"use --data={name} for it, or ./{name}", tmp_path, capsys=capsys)


def test_data_and_data_path_together_and_resume_with_init_from_are_refused(tmp_path, capsys):
    assert_refused(lambda: train.parse_args(["--data=shapes", "--data-path=x"]), "exactly one of --data-path",
                   tmp_path, capsys=capsys)
    assert_refused(lambda: train.parse_args(["--data=shapes", "--resume=latest", "--init-from=x.pt"]),
                   "give one", tmp_path, capsys=capsys)


#################################################################################
#                      train.py: run directories and resumption                 #
#################################################################################

def test_a_fresh_start_never_writes_into_a_run_with_checkpoints(run_dir):
    assert_refused(lambda: run_train(run_dir), "already holds checkpoints", run_dir)


def test_a_fresh_start_never_writes_over_the_records_of_a_run_without_checkpoints(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "args.json").write_text("{}")
    (tmp_path / "run" / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    assert_refused(lambda: run_train(tmp_path), "holds the records (args.json, log.jsonl) of a run that wrote no "
                   "checkpoint", tmp_path)


@pytest.mark.parametrize("flag, key", [("--seed=1", "seed"), ("--eval-samples=7", "eval_samples"),
                                       ("--routing=dynamic", "routing"), ("--global-batch-size=8", "global_batch_size")])
def test_resume_refuses_settings_that_would_not_continue_the_run(run_dir, flag, key):
    assert_refused(lambda: run_train(run_dir, "--resume=latest", flag, steps=6), f"'{key}'", run_dir)


def test_a_flag_that_no_resume_rule_names_defines_the_run(tmp_path, monkeypatch, capsys):
    """A flag a forker adds (here ema_warmup) is refused on resume when it changes, until train.py names it
    RETUNABLE, whereupon the change is printed."""
    run_train(tmp_path)  # a run of its own: the resume below writes step 6
    parse = train.parse_args
    monkeypatch.setattr(train, "parse_args", lambda argv: argparse.Namespace(**vars(parse(argv)), ema_warmup=5))
    assert_refused(lambda: run_train(tmp_path, "--resume=latest", steps=6), "'ema_warmup': (None, 5)", tmp_path)
    monkeypatch.setattr(train, "RETUNABLE", (*train.RETUNABLE, "ema_warmup"))
    run_train(tmp_path, "--resume=latest", steps=6)
    assert "changed (checkpoint, now): {'ema_warmup': (None, 5)}" in capsys.readouterr().out


def test_resume_allows_and_records_a_new_precision_and_micro_batch(tmp_path, capsys):
    run_train(tmp_path, "--global-batch-size=4")
    ckpts = files(tmp_path / "run" / "checkpoints")
    run_train(tmp_path, "--resume=latest", "--micro-batch-size=2", steps=6)
    out = capsys.readouterr().out
    assert "changed (checkpoint, now): {'micro_batch_size': (None, 2)}" in out
    assert {k: v for k, v in files(tmp_path / "run" / "checkpoints").items() if k in ckpts} == ckpts
    resumed = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl") if "resumed" in line]
    assert resumed[0]["step"] == 3 and resumed[0]["resumed"]["micro_batch_size"] == 2


def test_resume_latest_in_an_empty_directory_says_so(tmp_path):
    assert_refused(lambda: run_train(tmp_path, "--resume=latest"), "--resume latest: no checkpoint in", tmp_path)


@pytest.mark.parametrize("bad, message", [("empty.pt", "is empty (0 bytes)"),
                                          ("random.pt", "is not a checkpoint that can be read safely"),
                                          ("tensors.pt", "it is not a checkpoint of train.py")])
def test_resume_from_a_file_that_is_not_a_checkpoint_names_it(tmp_path, bad_files, bad, message):
    assert_refused(lambda: run_train(tmp_path, f"--resume={bad_files / bad}", name="fresh"), message, bad_files)
    assert not (tmp_path / "fresh" / "args.json").exists()


def test_resume_never_loads_non_finite_state(tmp_path):
    run_train(tmp_path)
    ckpt = load_checkpoint(str(tmp_path / "run" / "checkpoints" / "0000003.pt"))
    ckpt["model"]["pos_embed"][0, 0, 0] = float("nan")
    torch.save(ckpt, tmp_path / "run" / "checkpoints" / "0000006.pt")
    assert_refused(lambda: run_train(tmp_path, "--resume=latest", steps=9), "0000006.pt holds non-finite values",
                   tmp_path)


@pytest.mark.parametrize("bad, message", [("empty.pt", "is empty (0 bytes)"),
                                          ("random.pt", "is not a checkpoint that can be read safely"),
                                          ("tensors.pt", "holds no SiT weights"),
                                          ("classifier.pt", "holds no SiT weights")])
def test_init_from_a_file_that_is_not_sit_weights_names_it(tmp_path, bad_files, bad, message):
    assert_refused(lambda: run_train(tmp_path, f"--init-from={bad_files / bad}", name="fresh"), message, bad_files)


def test_init_from_records_the_sha256_of_its_weights(run_dir, tmp_path):
    source = run_dir / "run" / "checkpoints" / "0000003.pt"
    run_train(tmp_path, f"--init-from={source}")
    weights = load_checkpoint(str(tmp_path / "run" / "checkpoints" / "0000003.pt"))["weights"]
    assert weights["init_from"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()


def test_a_nan_gradient_under_a_finite_loss_is_never_written_and_the_advice_resumes(tmp_path, monkeypatch):
    original, calls = train.train_step, []

    def poisoned(args, module, *rest):
        calls.append(1)
        trainable = [p for p in module.parameters() if p.requires_grad] if len(calls) == 5 else []
        hooks = [p.register_hook(lambda g: g * float("nan")) for p in trainable]
        try:
            return original(args, module, *rest)
        finally:
            for hook in hooks:
                hook.remove()

    monkeypatch.setattr(train, "train_step", poisoned)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    with pytest.raises(SystemExit) as stop:
        run_train(tmp_path, "--ckpt-every=1", "--log-every=4", steps=8)
    # The loss of step 5 was finite; its gradient was not. Checkpoint 5 would be NaN in model, EMA and optimiser.
    assert "a gradient is not finite" in str(stop.value) and str(ckpt_dir / "0000004.pt") in str(stop.value)
    assert sorted(os.listdir(ckpt_dir)) == [f"{s:07d}.pt" for s in range(1, 5)]
    for name in os.listdir(ckpt_dir):
        ckpt = load_checkpoint(str(ckpt_dir / name))
        for part in ("model", "ema"):
            assert all(torch.isfinite(v).all() for v in ckpt[part].values())
    # The advice (resume from it with a lower --lr or a clip) is accepted by the resume check.
    monkeypatch.setattr(train, "train_step", original)
    run_train(tmp_path, f"--resume={ckpt_dir / '0000004.pt'}", "--lr=5e-4", "--grad-clip=1.0", "--ckpt-every=1",
              "--log-every=4", steps=8)
    assert load_checkpoint(str(ckpt_dir / "0000008.pt"))["args"]["lr"] == 5e-4
    logged = [json.loads(line)["step"] for line in open(tmp_path / "run" / "log.jsonl") if '"loss"' in line]
    assert logged == [4, 8]  # step 5's failed attempt never reached the log


#################################################################################
#                    Checkpoint writes: kill -9 and a full disk                 #
#################################################################################

def test_kill_9_during_a_checkpoint_write_leaves_the_earlier_ones_and_no_half_file(run_dir, tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    shutil.copytree(run_dir / "run" / "checkpoints", ckpt_dir)
    before = files(ckpt_dir)
    writer = ("import sys, torch; from checkpoint import save_checkpoint; "
              "save_checkpoint({'x': torch.zeros(200_000_000, dtype=torch.uint8)}, sys.argv[1])")
    proc = subprocess.Popen([sys.executable, "-c", writer, str(ckpt_dir / "0000006.pt")], cwd=ROOT)
    while not (ckpt_dir / "0000006.pt.tmp").exists() and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (ckpt_dir / "0000006.pt").exists(), "the write finished before the kill: nothing was tested"
    assert {k: v for k, v in files(ckpt_dir).items() if not k.endswith(".tmp")} == before
    assert train.checkpoints_by_step(str(ckpt_dir))[0][1].endswith("0000003.pt")  # a .tmp is never "latest"


def test_a_full_disk_keeps_earlier_checkpoints_and_removes_the_partial_file(run_dir, tmp_path, monkeypatch):
    ckpt_dir = tmp_path / "checkpoints"
    shutil.copytree(run_dir / "run" / "checkpoints", ckpt_dir)

    def full(obj, path):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 the first bytes")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    assert_refused(lambda: save_checkpoint({"x": torch.zeros(3)}, str(ckpt_dir / "0000006.pt")),
                   "(No space left on device; ", ckpt_dir)
    assert_refused(lambda: save_checkpoint({"x": torch.zeros(3)}, str(ckpt_dir / "0000006.pt")),
                   "the partial file was removed and every earlier checkpoint is kept",
                   ckpt_dir)
    assert not (ckpt_dir / "0000006.pt.tmp").exists()


def test_a_real_full_disk_on_a_tiny_tmpfs(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode:
        pytest.skip(f"this machine does not let the tests mount a tmpfs ({made.stderr.decode().strip()})")
    try:
        save_checkpoint({"x": torch.zeros(10)}, str(mount / "0000001.pt"))
        before = files(mount)
        assert_refused(lambda: save_checkpoint({"x": torch.zeros(1_000_000)}, str(mount / "0000002.pt")),
                       "the partial file was removed", mount)
        assert files(mount) == before
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)  # lazy: the failed write may hold a descriptor


#################################################################################
#                      Weight files: downloads and their hashes                 #
#################################################################################

def test_a_file_whose_name_carries_a_hash_must_match_it(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    assert_refused(lambda: load_checkpoint(str(tmp_path / "pt_inception-2015-12-05-6726825d.pth")),
                   "is not the file its name says: its sha256 does not start with 6726825d", tmp_path)
    good = hashlib.sha256((tmp_path / "pt_inception-2015-12-05-6726825d.pth").read_bytes()).hexdigest()[:8]
    os.rename(tmp_path / "pt_inception-2015-12-05-6726825d.pth", tmp_path / f"weights-{good}.pth")
    assert load_checkpoint(str(tmp_path / f"weights-{good}.pth"))["w"].shape == (2,)


def test_a_download_that_fails_says_what_to_do_instead(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with socket.socket() as s:  # a port on this machine that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert_refused(lambda: resolve(f"http://127.0.0.1:{port}/weights.pth"),
                   "Download it on a machine with network access and give its local path instead", tmp_path)
    assert not (tmp_path / "hub" / "checkpoints").exists()  # no empty cache folder left behind


#################################################################################
#                      sample.py, diagnose.py, toy_accuracy.py                  #
#################################################################################

def test_sample_refuses_a_directory_as_out(run_dir, tmp_path, capsys):
    ckpt = str(run_dir / "run" / "checkpoints" / "0000003.pt")
    assert_refused(lambda: sample.parse_args([f"--ckpt={ckpt}", f"--out={tmp_path}"]), "--out", tmp_path,
                   capsys=capsys)
    (tmp_path / "grid.png").mkdir()
    assert_refused(lambda: sample.parse_args([f"--ckpt={ckpt}", f"--out={tmp_path / 'grid.png'}"]),
                   "is a directory: give the file to write", tmp_path, capsys=capsys)


def test_sample_refuses_classes_the_model_does_not_know_before_sampling(run_dir, tmp_path):
    ckpt = str(run_dir / "run" / "checkpoints" / "0000003.pt")
    args = sample.parse_args([f"--ckpt={ckpt}", "--classes", "3", "10", "-1", f"--out={tmp_path / 'g.png'}"])
    assert_refused(lambda: sample.main(args), "--classes [10, -1]: ", tmp_path)
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("bad, message", [("empty.pt", "is empty (0 bytes)"),
                                          ("random.pt", "is not a checkpoint that can be read safely"),
                                          ("tensors.pt", "neither a train.py checkpoint")])
def test_sample_and_diagnose_name_a_bad_checkpoint(tmp_path, bad_files, bad, message):
    out = tmp_path / "out"
    assert_refused(lambda: sample.main(sample.parse_args([f"--ckpt={bad_files / bad}", f"--out={out}.png"])),
                   message, bad_files)
    assert_refused(lambda: diagnose.main(diagnose.parse_args([f"--ckpt={bad_files / bad}", f"--out={out}"])), message,
                   bad_files)


def test_diagnose_refuses_repeated_labels_and_keeps_two_checkpoints_of_one_routing(run_dir, tmp_path, capsys):
    ckpt = str(run_dir / "run" / "checkpoints" / "0000003.pt")
    assert_refused(lambda: diagnose.parse_args([f"--ckpt={ckpt}", f"--ckpt={ckpt}", "--label=a", "--label=a"]),
                   "--label names must differ", tmp_path, capsys=capsys)
    copy = tmp_path / "again.pt"
    shutil.copy(ckpt, copy)
    diagnose.main(diagnose.parse_args([f"--ckpt={ckpt}", f"--ckpt={copy}", f"--out={tmp_path / 'd'}", "--t", "1.0",
                                       "--num-samples=4", "--map-steps=2", "--probe-pairs=8", "--probe-steps=2"]))
    results = json.load(open(tmp_path / "d" / "diagnostics.json"))
    assert len(results) == 2 and "static c4" in results


@pytest.mark.parametrize("bad, message", [("random.pt", "is not a checkpoint that can be read safely"),
                                          ("tensors.pt", "is not a shape classifier saved by toy_accuracy.py")])
def test_toy_accuracy_names_a_bad_classifier(bad_files, bad, message):
    assert_refused(lambda: toy_accuracy.load_classifier(16, str(bad_files / bad)), message, bad_files)


#################################################################################
#                               prepare_imagenet.py                             #
#################################################################################

def image_folder(root, classes=("a", "b"), per_class=2):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def prepare(data, out, *extra):
    prepare_imagenet.main(prepare_imagenet.parse_args([f"--data-path={data}", f"--out={out}", "--image-size=16",
                                                       "--vae=random", "--shard-size=2", "--workers=0", *extra]))


def test_prepare_refuses_to_resume_with_another_data_path(tmp_path):
    first, second = image_folder(tmp_path / "one"), image_folder(tmp_path / "two", classes=("c", "d"))
    (tmp_path / "out").mkdir()
    prepare_imagenet.load_plan(prepare_imagenet.parse_args([f"--data-path={first}", f"--out={tmp_path / 'out'}",
                                                           "--image-size=16", "--vae=random"]), 0, 1)
    assert_refused(lambda: prepare(second, tmp_path / "out"), "resuming would mix two datasets", tmp_path / "out")


def test_prepare_refuses_a_class_folder_that_links_back_into_the_data(tmp_path):
    data = image_folder(tmp_path / "data")
    os.symlink(data, data / "zz_loop")
    assert_refused(lambda: prepare(data, tmp_path / "out"), "contains --data-path itself", data)
    assert not (tmp_path / "out" / "plan.json").exists()


def test_prepare_refuses_an_unreadable_folder(tmp_path, monkeypatch):
    data = image_folder(tmp_path / "data")
    scandir = os.scandir

    def denied(path="."):
        if str(path).endswith(os.sep + "b"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denied)  # root reads any folder, so the refusal is staged
    assert_refused(lambda: prepare(data, tmp_path / "out"), "cannot read", data)
    assert not (tmp_path / "out" / "plan.json").exists()


def test_prepare_refuses_a_tree_without_images(tmp_path):
    data = tmp_path / "data"
    for name in ("a", "b"):
        (data / name).mkdir(parents=True)
        (data / name / "notes.txt").write_text("not an image")
    assert_refused(lambda: prepare(data, tmp_path / "out"), "hold no image files", data)


def test_prepare_scales_16_bit_images_instead_of_clipping_them(tmp_path):
    pixels = np.full((32, 32), 32768, dtype=np.uint16)  # half of 16-bit white
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    crop, why = prepare_imagenet.load_image(str(tmp_path / "deep.png"), 16)
    assert why is None and crop.shape == (16, 16, 3) and np.all(crop == 128)


def test_prepare_refuses_a_second_run_on_the_same_out_and_takes_over_a_dead_ones_lock(tmp_path):
    data, out = image_folder(tmp_path / "data"), tmp_path / "out"
    out.mkdir()
    (out / ".lock").write_text(f"{socket.gethostname()} {os.getpid()}")  # a live process: this one
    assert_refused(lambda: prepare(data, out), "is being written by another run", out)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(f"{socket.gethostname()} {dead.pid}")
    prepare(data, out)
    assert (out / "manifest.json").exists() and not (out / ".lock").exists()
    assert json.load(open(out / "manifest.json"))["vae_sha256"] is None  # random weights: no file to hash


def test_init_from_a_checkpoint_of_another_architecture_names_the_first_tensor_that_differs(run_dir, tmp_path):
    ckpt = str(run_dir / "run" / "checkpoints" / "0000003.pt")
    wider = [a if not a.startswith("--hidden-size") else "--hidden-size=48" for a in TINY]
    args = train.parse_args(["--data=shapes", *wider, "--global-batch-size=4", "--max-steps=1",
                             f"--init-from={ckpt}", f"--results-dir={tmp_path / 'run'}"])
    assert_refused(lambda: train.main(args), "is another architecture: ", run_dir, tmp_path)


def test_a_checkpoint_older_than_a_run_defining_flag_resumes_as_that_flag_s_old_value(tmp_path):
    run_train(tmp_path, steps=3)
    path = tmp_path / "run" / "checkpoints" / "0000003.pt"
    ckpt = load_checkpoint(str(path))
    for flag in train.ADDED:  # as a checkpoint written before these flags existed
        del ckpt["args"][flag]
    save_checkpoint(ckpt, str(path))
    run_train(tmp_path, "--resume=latest", steps=4)
    assert (tmp_path / "run" / "checkpoints" / "0000004.pt").exists()
    with pytest.raises(SystemExit, match="repa_state"):  # its value is still run-defining
        run_train(tmp_path, "--resume=latest", "--repa-state=summary", steps=5)
