"""Tests of diagnose.py on tiny checkpoints trained for a few steps on the toy data (CPU)."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import diagnose
from checkpoint import load_model
from train import main as train_main, parse_args as train_args


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{routing: path} of residual and dynamic (chunk 2) SiTs, 3 blocks, trained 20 steps on 16px shapes."""
    root = tmp_path_factory.mktemp("diag")
    paths = {}
    for routing in ("residual", "dynamic"):
        train_main(train_args(["--data=shapes", "--image-size=16", "--model=SiT-S/4", "--depth=3", "--hidden-size=32",
                               "--num-heads=2", f"--routing={routing}", "--chunk=2", "--precision=fp32", "--lr=3e-3",
                               "--global-batch-size=8", "--max-steps=20", "--eval-every=0", "--sample-every=0",
                               "--ckpt-every=20", "--ema-decay=0", f"--results-dir={root / routing}"]))
        paths[routing] = str(root / routing / "checkpoints" / "0000020.pt")
    return paths


def inputs(model, n=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g, dtype=dtype)
    return x, torch.rand(n, generator=g, dtype=dtype), torch.randint(0, cfg.num_classes, (n,), generator=g)


@pytest.mark.parametrize("routing", ["residual", "dynamic"])
def test_trace_and_the_measurement_gates_leave_the_output_bit_identical(checkpoints, routing):
    model = load_model(checkpoints[routing]).eval()
    x, t, y = inputs(model)
    with torch.no_grad():
        expected = model(x, t, y)
    for gates in ((False, True) if routing == "residual" else (False,)):
        v, out = diagnose.trace(model, x, t, y, gates=gates)
        assert torch.equal(v, expected), gates
        assert len(out["h"]) == 2 * model.config.depth + 1
    if routing == "residual":  # z_k = h_{2k+1} is the state after block k, as the model reports it
        _, extras = model(x, t, y, return_states=True)
        assert all(torch.equal(a, b) for a, b in zip(out["h"][2::2], extras["z"]))
    else:
        assert [a.shape[-1] for a in out["alpha"]] == [len(S) for S in model.routers.source_sets]


def test_gate_gradients_equal_finite_differences(checkpoints):
    model = load_model(checkpoints["residual"]).double().eval()
    x, t, y = inputs(model, dtype=torch.float64)
    u = torch.randn_like(x)
    v, out = diagnose.trace(model, x, t, y, gates=True)
    F.mse_loss(v, u).backward()
    L, delta = 2 * model.config.depth, 1e-6
    for l, i in [(1, 0), (3, 1), (4, 0), (L, L - 1), (L + 1, 2)]:
        def loss(shift):
            gates = [torch.ones(k, dtype=torch.float64) for k in range(1, L + 2)]
            gates[l - 1][i] += shift
            with torch.no_grad():
                return F.mse_loss(diagnose.trace(model, x, t, y, gates=gates)[0], u).item()
        fd = (loss(delta) - loss(-delta)) / (2 * delta)
        assert out["gates"][l - 1].grad[i].item() == pytest.approx(fd, rel=1e-5, abs=1e-10), (l, i)


def test_probe_finds_t_where_it_is_linear_and_not_in_noise():
    rng = np.random.default_rng(0)
    pairs, steps = 40, 12
    t = np.tile(np.linspace(0, 1, steps), pairs)
    groups = np.repeat(np.arange(pairs), steps)
    test = groups >= 30
    noise = rng.standard_normal((len(t), 20))
    linear = np.concatenate([0.3 * t[:, None] + 0.01 * rng.standard_normal((len(t), 1)), noise], 1)
    assert diagnose.ridge_r2(linear, t, groups, test) > 0.99
    assert abs(diagnose.ridge_r2(noise, t, groups, test)) < 0.1


def test_diagnose_writes_every_number_and_readable_figures(checkpoints, tmp_path):
    out = tmp_path / "diag"
    diagnose.main(diagnose.parse_args(["--ckpt", checkpoints["residual"], "--ckpt", checkpoints["dynamic"],
                                       "--t", "1.0", "0.3", "--num-samples=8", "--map-steps=5", "--probe-pairs=8",
                                       "--probe-steps=6", f"--out={out}"]))
    with open(out / "diagnostics.json") as f:
        results = json.load(f)
    assert list(results) == ["residual", "dynamic c2"]
    for r in results.values():
        blocks = r["per_block"]["0.3"]
        assert len(blocks["forward_rms"]) == len(blocks["backward_rms"]) == 3 and len(blocks["cosine"]) == 2
        assert all(v > 0 for v in blocks["forward_rms"] + blocks["backward_rms"])
        assert list(r["mixing"]) == ["1", "6"] and len(r["probe"]["r2"]) == 7
        assert all(len(row) == 5 for m in r["mixing"].values() for row in m["values"])
    dar = results["dynamic c2"]["mixing"]["6"]
    assert np.allclose(np.sum(dar["values"], 0), 1, atol=1e-5)  # routing weights: a distribution at every t
    names = ["forward_rms_t1.0", "backward_rms_t0.3", "cosine_t1.0", "mixing_residual", "mixing_dynamic_c2", "probe"]
    for name in names:
        image = np.asarray(Image.open(out / f"{name}.png").convert("RGB"))
        assert image.shape[0] > 100 and len(np.unique(image.reshape(-1, 3), axis=0)) > 10, name
