"""Tests of fid.py (the ADM metrics in PyTorch) and sample.py (samplers, grids, resumable N-sample runs) on the
CPU, against closed forms, brute force and independent implementations; randomly initialised networks."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn

import fid
import inception
from checkpoint import load_model, save_checkpoint
from model import SiT, model_config
from sample import LAST_STEP, sample_ode, sample_sde

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, where the scripts are


#################################################################################
#                              The Inception network                            #
#################################################################################

def test_inception_has_the_public_checkpoints_472_keys_and_loads_strictly(tmp_path):
    expected = {}
    for line in open(os.path.join(HERE, "testdata", "inception_keys.txt")):
        if not line.startswith("#"):
            key, shape = line.rstrip("\n").split("\t")
            expected[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    net = fid.load_inception("random")
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == expected and len(expected) == 472
    torch.save(net.state_dict(), tmp_path / "pt_inception.pth")
    loaded = fid.load_inception(str(tmp_path / "pt_inception.pth"))
    images = torch.randint(0, 256, (2, 40, 40, 3), dtype=torch.uint8)
    out = loaded(images)
    assert out["pool"].shape == (2, 2048) and out["spatial"].shape == (2, 2023) and out["logits"].shape == (2, 1008)
    torch.testing.assert_close(out["pool"], net(images)["pool"], rtol=0, atol=0)


def test_inception_loads_the_released_files_566_keys_with_batchnorm_counters(tmp_path):
    # The released file was written by a network built from torch's own BatchNorm2d, which stores a
    # num_batches_tracked counter per layer; rebuild such a network and write its checkpoint the same way.
    net = fid.load_inception("random")
    torch_bn = fid.load_inception("random")
    for conv in [m for m in torch_bn.modules() if isinstance(m, inception.BasicConv2d)]:
        bn = nn.BatchNorm2d(conv.bn.weight.shape[0], eps=1e-3)
        bn.load_state_dict(conv.bn.state_dict(), strict=False)
        conv.bn = bn.eval()
    state = torch_bn.state_dict()
    assert len(state) == 566 and sum(k.endswith("num_batches_tracked") for k in state) == 94
    torch.save(state, tmp_path / "inception_566_keys.pth")  # the real name would fail its hash check
    loaded = fid.load_inception(str(tmp_path / "inception_566_keys.pth"))
    images = torch.randint(0, 256, (2, 40, 40, 3), dtype=torch.uint8)
    torch.testing.assert_close(loaded(images)["pool"], net(images)["pool"], rtol=0, atol=0)
    torch.testing.assert_close(torch_bn(images)["pool"], net(images)["pool"], rtol=0, atol=0)
    state["Mixed_7c.branch_pool.conv.extra"] = torch.zeros(1)  # any other stray key is still refused
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fid.load_inception(str(tmp_path / "bad.pth"))


def test_sfid_features_are_mixed_6d_branch1x1_channels_0_to_6_in_hwc_order():
    net = fid.load_inception("random")
    seen = {}
    net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    spatial = net(torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8))["spatial"]
    out = seen["out"]  # (2, 192, 17, 17), after the ReLU
    assert out.shape == (2, 192, 17, 17)
    for h, w, c in [(0, 0, 0), (0, 1, 0), (0, 0, 6), (3, 11, 5), (16, 16, 6)]:
        assert spatial[1, (h * 17 + w) * 7 + c] == out[1, c, h, w]


def tf1_resize_reference(image, size):
    """TF1's resize_bilinear(align_corners=False) pixel by pixel in float64: y = i * in / out."""
    H, W = image.shape
    out = np.zeros((size, size))
    for i in range(size):
        y = i * H / size
        y0, y1 = int(np.floor(y)), min(int(np.floor(y)) + 1, H - 1)
        for j in range(size):
            x = j * W / size
            x0, x1 = int(np.floor(x)), min(int(np.floor(x)) + 1, W - 1)
            top = image[y0, x0] + (image[y0, x1] - image[y0, x0]) * (x - x0)
            bottom = image[y1, x0] + (image[y1, x1] - image[y1, x0]) * (x - x0)
            out[i, j] = top + (bottom - top) * (y - y0)
    return out


@pytest.mark.parametrize("shape", [(256, 256), (32, 32), (17, 40), (299, 299)])
def test_tf1_resize_matches_its_formula(shape):
    image = np.random.default_rng(0).integers(0, 256, shape).astype(np.float64)
    ours = inception.tf1_resize(torch.tensor(image, dtype=torch.float32)[None, None], 299)[0, 0].double().numpy()
    np.testing.assert_allclose(ours, tf1_resize_reference(image, 299), rtol=1e-5, atol=1e-5 * 255)


#################################################################################
#                                    Metrics                                    #
#################################################################################

def random_covariance(rng, d):
    a = rng.standard_normal((d, 2 * d))
    return a @ a.T / (2 * d)


def test_frechet_distance_closed_form_and_scipy():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)  # diagonal: sum of (sqrt a - sqrt b)^2
    closed = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed, rel=1e-12)
    assert fid.frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0, abs=1e-12)
    for d in (5, 64, 300):
        s1, s2 = random_covariance(rng, d), random_covariance(rng, d)
        m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
        covmean = scipy.linalg.sqrtm(s1 @ s2).real  # the TTUR/ADM route
        ttur = (m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
        assert fid.frechet_distance(m1, s1, m2, s2) == pytest.approx(ttur, rel=1e-8)


def test_inception_score_on_constructed_logits():
    K = 10
    onehot = np.full((5000, 1008), -1e4)
    onehot[np.arange(5000), np.arange(5000) % K] = 0  # confident and balanced over K classes: IS = K
    assert fid.inception_score(onehot) == pytest.approx(K, rel=1e-9)
    assert fid.inception_score(np.tile(np.random.default_rng(0).standard_normal(1008), (100, 1))) == pytest.approx(1)
    logits = np.random.default_rng(1).standard_normal((700, 1008)) * 3
    expected = []
    for part in (logits[:300], logits[300:600], logits[600:]):  # consecutive splits, the last one short
        p = np.exp(part) / np.exp(part).sum(1, keepdims=True)
        expected.append(np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(0))), 1))))
    assert fid.inception_score(logits, split_size=300) == pytest.approx(np.mean(expected), rel=1e-10)


def brute_force_precision_recall(ref, samples, k=3):
    def radii(x):
        return [sorted(((x[i] - x[j]) ** 2).sum() for j in range(len(x)) if j != i)[k - 1] for i in range(len(x))]

    def cover(points, centres, r):
        return np.mean([any(((p - c) ** 2).sum() <= rc for c, rc in zip(centres, r)) for p in points])

    return cover(samples, ref, radii(ref)), cover(ref, samples, radii(samples))


def test_precision_recall_identical_far_apart_and_brute_force():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((60, 5))
    assert fid.precision_recall(ref, ref) == (1.0, 1.0)
    assert fid.precision_recall(ref, ref + 100) == (0.0, 0.0)
    samples = rng.standard_normal((45, 5)) * 1.3 + 0.4
    expected = brute_force_precision_recall(ref, samples)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    assert fid.precision_recall(ref, samples, half=False) == pytest.approx(expected, abs=1e-12)
    r, s = torch.tensor(ref, dtype=torch.float32), torch.tensor(samples, dtype=torch.float32)
    blocked = fid.coverage(s, r, fid.manifold_radii(r, block=7, half=False), block=4, half=False)  # blocks alike
    assert blocked == pytest.approx(expected[0], abs=1e-12)
    assert fid.precision_recall(ref * 1e3, samples * 1e3) == pytest.approx(expected, abs=1e-12)  # float16 overflows:
    # the float32 fallback, as ADM's


#################################################################################
#                 Against ADM's own evaluator (testdata/adm_fixtures.json)      #
#################################################################################

sys.path.insert(0, os.path.join(HERE, "testdata"))
import make_adm_fixtures  # noqa: E402 (the fixtures' inputs; NumPy only)

ADM = json.load(open(os.path.join(HERE, "testdata", "adm_fixtures.json")))


@pytest.mark.parametrize("name", sorted(ADM["resize"]))
def test_tf1_resize_is_bit_identical_to_tensorflow(name):
    image = make_adm_fixtures.resize_images()[name]
    ours = inception.tf1_resize(torch.from_numpy(image).permute(0, 3, 1, 2).float(), 299).permute(0, 2, 3, 1).numpy()
    assert make_adm_fixtures.digest(ours) == ADM["resize"][name]["sha256"]


def test_fid_and_inception_score_match_adm():
    for name, (ref, samples) in make_adm_fixtures.feature_sets().items():
        ours = fid.frechet_distance(*fid.statistics(samples), *fid.statistics(ref))
        assert ours == pytest.approx(ADM["fid"][name], rel=1e-6), name
    for name, logits in make_adm_fixtures.logits_sets().items():
        assert fid.inception_score(logits, split_size=500) == pytest.approx(ADM["inception_score"][name], rel=1e-6)


def test_precision_recall_match_adm_within_one_image():
    """ADM computes the distances in float16; so does fid.py by default. What is left is the order in which
    TensorFlow's float16 sums round: at most one image of the few hundred in each set (stated in fid.py)."""
    for name, (ref, samples) in make_adm_fixtures.feature_sets().items():
        want = ADM["precision_recall"][name]
        got = fid.precision_recall(ref, samples)
        assert abs(got[0] - want[0]) <= 1 / len(samples) + 1e-9 and abs(got[1] - want[1]) <= 1 / len(ref) + 1e-9


#################################################################################
#                                   Files in                                    #
#################################################################################

def test_bad_npz_files_say_what_is_wrong(tmp_path):
    good = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    cases = {"key": ({"images": good}, "no 'arr_0' array"),
             "dtype": ({"arr_0": good / 127.5 - 1}, "must be uint8 in \\[0, 255\\], got float64"),
             "channels_first": ({"arr_0": good.transpose(0, 3, 1, 2)}, "must be N x H x W x 3"),
             "gray": ({"arr_0": good[..., 0]}, "must be N x H x W x 3")}
    for name, (arrays, message) in cases.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        with pytest.raises(ValueError, match=message):
            list(fid.npz_batches(str(tmp_path / f"{name}.npz"), 2))
    np.savez(tmp_path / "good.npz", arr_0=good)
    batches = list(fid.npz_batches(str(tmp_path / "good.npz"), 2))
    assert [len(b) for b in batches] == [2, 1] and np.array_equal(np.concatenate(batches), good)


@pytest.fixture
def batches(tmp_path, monkeypatch):
    """A folder of .npz batches, good and bad, and a network that fails the test if it is ever loaded."""
    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: pytest.fail("the network was loaded first"))
    rng = np.random.default_rng(0)
    good = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "good.npz", arr_0=good)
    (tmp_path / "text.npz").write_text("not a zip")
    np.savez(tmp_path / "key.npz", images=good)
    np.savez(tmp_path / "empty.npz", arr_0=good[:0])
    np.savez(tmp_path / "fortran.npz", arr_0=np.asfortranarray(good))
    np.savez(tmp_path / "few.npz", arr_0=good[:3])
    np.savez(tmp_path / "mu.npz", arr_0=good, mu=np.zeros(1000), sigma=np.eye(2048), mu_s=np.zeros(2023),
             sigma_s=np.eye(2023))
    np.savez(tmp_path / "big.npz", arr_0=rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    data = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) * 2 // 3])  # a copy or a sample run that did not finish
    return tmp_path


@pytest.mark.parametrize("ref, samples, message", [
    ("missing.npz", "good.npz", "reference batch .*missing.npz: no such file"),
    ("text.npz", "good.npz", "text.npz is not a complete .npz \\(zip\\) file"),
    ("good.npz", "cut.npz", "sample batch .*cut.npz is not a complete .npz \\(zip\\) file: cut short"),
    ("good.npz", "key.npz", "key.npz has no 'arr_0' array"),
    ("good.npz", "empty.npz", "empty.npz: arr_0 holds no images"),
    ("fortran.npz", "good.npz", "must be N x H x W x 3"),
    ("good.npz", "few.npz", "holds 3 images; precision and recall need at least 4"),
    ("mu.npz", "good.npz", "mu must be \\(2048,\\).*found \\(1000,\\)"),
    ("good.npz", "big.npz", "reference images are \\(8, 8\\) and samples \\(16, 16\\)"),
], ids=["missing", "not a zip", "cut short", "no arr_0", "empty", "channels first", "too few", "bad statistics",
        "another resolution"])
def test_bad_batches_are_refused_before_any_network_runs(batches, ref, samples, message):
    with pytest.raises(ValueError, match=message):
        fid.main([str(batches / ref), str(batches / samples)])


def test_batches_that_are_legal_but_probably_wrong_are_warned_about(batches):
    np.savez(batches / "unit.npz", arr_0=(np.load(batches / "good.npz")["arr_0"] > 128).astype(np.uint8))
    with pytest.warns(UserWarning) as caught:
        with pytest.raises(pytest.fail.Exception, match="the network was loaded first"):
            fid.main([str(batches / "unit.npz"), str(batches / "good.npz")])
    said = " ".join(str(w.message) for w in caught)
    assert "splits of 5000" in said and "[0, 1] data" in said


def test_evaluate_end_to_end_and_reference_statistics(tmp_path):
    net = fid.load_inception("random")
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    other = np.clip(ref.astype(int) // 2 + 100, 0, 255).astype(np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    np.savez(tmp_path / "other.npz", arr_0=other)
    same = fid.evaluate(str(tmp_path / "ref.npz"), str(tmp_path / "ref.npz"), net, batch_size=4)
    assert abs(same["fid"]) < 1e-6 * 2048 and abs(same["sfid"]) < 1e-6 * 2023
    assert same["precision"] == same["recall"] == 1.0
    diff = fid.evaluate(str(tmp_path / "ref.npz"), str(tmp_path / "other.npz"), net, batch_size=4)
    assert diff["fid"] > 1 and diff["sfid"] > 1
    # With mu, sigma, mu_s, sigma_s in the reference (ADM's batches), those statistics are used.
    acts = fid.features(net, [other])
    (mu, sigma), (mu_s, sigma_s) = fid.statistics(acts["pool"]), fid.statistics(acts["spatial"])
    np.savez(tmp_path / "stats.npz", arr_0=ref, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    stats = fid.evaluate(str(tmp_path / "stats.npz"), str(tmp_path / "other.npz"), net, batch_size=4)
    assert abs(stats["fid"]) < 1e-6 * 2048 and abs(stats["sfid"]) < 1e-6 * 2023
    assert stats["precision"] == diff["precision"]


def test_fid_cli_on_a_toy_reference_batch(tmp_path):
    torch.save(fid.load_inception("random").state_dict(), tmp_path / "inception.pth")
    fid.main(["--make-ref", "shapes", "--image-size", "16", "--num", "8", str(tmp_path / "ref.npz"),
              f"--inception={tmp_path / 'inception.pth'}"])
    with np.load(tmp_path / "ref.npz") as f:
        assert f["arr_0"].shape == (8, 16, 16, 3) and f["arr_0"].dtype == np.uint8
        acts = fid.features(fid.load_inception("random"), [f["arr_0"]])
        np.testing.assert_allclose(f["mu"], acts["pool"].mean(0), rtol=1e-12)
        np.testing.assert_allclose(f["sigma_s"], np.cov(acts["spatial"], rowvar=False), rtol=1e-10, atol=1e-14)
    out = subprocess.run([sys.executable, "fid.py", str(tmp_path / "ref.npz"), str(tmp_path / "ref.npz"),
                          f"--inception={tmp_path / 'inception.pth'}", f"--json={tmp_path / 'm.json'}"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "FID: " in out and "Precision: 1.0" in out and os.path.exists(tmp_path / "m.json")


#################################################################################
#                                   Samplers                                    #
#################################################################################

class GaussianVelocity(nn.Module):
    """The exact velocity of SiT's interpolant for data x1 ~ N(m, s^2) per coordinate: with x_t = t x1 +
    (1 - t) eps, var_t = t^2 s^2 + (1 - t)^2 and v = m + (t s^2 - (1 - t)) / var_t * (x - t m)."""

    def __init__(self, m=2.0, s=0.5):
        super().__init__()
        self.m, self.s = m, s
        self.config = type("Config", (), {"num_classes": 10})
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((x.clone(), t[0].item(), len(x)))
        t = t.view(-1, 1, 1, 1).double()
        var = t ** 2 * self.s ** 2 + (1 - t) ** 2
        return (self.m + (t * self.s ** 2 - (1 - t)) / var * (x - t * self.m)).to(x.dtype)

    def forward_with_cfg(self, x, t, y, cfg_scale, legacy_channels=False):
        return self(x, t, y)


def test_ode_samplers_reach_the_analytic_map_at_orders_1_and_2():
    model = GaussianVelocity()
    z = torch.randn(64, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(64, dtype=torch.long)
    exact = model.m + model.s * z  # the ODE's flow map for Gaussian data is affine
    for heun, order in ((False, 1), (True, 2)):
        errors = [(sample_ode(model, z, y, n, heun=heun) - exact).abs().max().item() for n in (20, 40, 80)]
        rates = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
        assert errors[-1] < 0.03 and np.allclose(rates, order, atol=0.15), (heun, errors, rates)


def test_sde_sampler_matches_the_data_distribution_and_ends_without_noise():
    model = GaussianVelocity()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20_000, 1, 1, 1, dtype=torch.float64, generator=g)
    x = sample_sde(model, z, torch.zeros(20_000, dtype=torch.long), num_steps=250, generator=g)
    assert x.mean().item() == pytest.approx(model.m, abs=0.02) and x.std().item() == pytest.approx(model.s, abs=0.02)
    assert len(model.calls) == 250  # one velocity call per step
    x_last, t_last, _ = model.calls[-1]
    assert t_last == pytest.approx(1 - LAST_STEP)
    v = model(x_last, torch.full((len(x_last),), t_last, dtype=torch.float64), None)
    torch.testing.assert_close(x, x_last + LAST_STEP * (v + t_last * v - x_last))  # the drift alone: no noise


def test_guidance_interval_runs_the_doubled_batch_only_inside_it():
    model = GaussianVelocity()
    z, y = torch.randn(4, 1, 2, 2), torch.zeros(4, dtype=torch.long)
    sample_ode(model, z, y, 10, cfg_scale=2.0, heun=False, interval=(0.5, 1.0))
    assert [(t, n) for _, t, n in model.calls] == [(pytest.approx(i / 10), 4 if i < 5 else 8) for i in range(10)]


#################################################################################
#                                  sample.py                                    #
#################################################################################

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A train.py-format checkpoint of a tiny pixel-space DAR model (16px RGB, 10 classes)."""
    torch.manual_seed(0)
    model = SiT(input_size=16, patch_size=4, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                learn_sigma=False, routing="dynamic", chunk=2)
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.pt")
    state = model.state_dict()
    save_checkpoint({"config": model_config(model), "model": state, "ema": state, "step": 0}, path)
    return path


def sample(*args, torchrun=False, wait=True):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else [sys.executable]
    proc = subprocess.Popen([*launcher, "sample.py", *args], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    out = proc.communicate()[0]
    assert proc.returncode == 0, out
    return out


def test_fid_samples_are_exact_in_number_unique_and_the_same_on_two_processes_and_after_a_stop_and_a_kill(
        tiny_checkpoint, tmp_path):
    common = [f"--ckpt={tiny_checkpoint}", "--num-fid-samples=11", "--batch-size=2", "--sampler=sde", "--num-steps=150"]
    sample(*common, f"--out={tmp_path / 'one.npz'}")
    with np.load(tmp_path / "one.npz") as f:
        one = f["arr_0"]
    assert one.shape == (11, 16, 16, 3) and one.dtype == np.uint8 and len(np.unique(one, axis=0)) == 11
    sample(*common, f"--out={tmp_path / 'two.npz'}", torchrun=True)
    with np.load(tmp_path / "two.npz") as f:
        np.testing.assert_array_equal(f["arr_0"], one)  # rank-disjoint batches, each a function of the seed
    proc = sample(*common, f"--out={tmp_path / 'killed.npz'}", wait=False)  # a SIGTERM stops after a batch
    parts = tmp_path / "killed.parts"
    while proc.poll() is None and not (parts.exists() and any(p.endswith(".npy") for p in os.listdir(parts))):
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    said = proc.communicate()[0]
    assert proc.returncode == 128 + signal.SIGTERM, said
    assert "SIGTERM: stopped after a batch; " in said and "Run the same command to make the rest" in said
    assert not any(p.endswith(".tmp") for p in os.listdir(parts)) and not (tmp_path / "killed.npz").exists()
    proc = sample(*common, f"--out={tmp_path / 'killed.npz'}", wait=False)  # then a kill -9 after two more
    stopped = len([p for p in os.listdir(parts) if p.endswith(".npy")])
    while proc.poll() is None and len([p for p in os.listdir(parts) if p.endswith(".npy")]) < stopped + 2:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed.npz").exists(), "finished before it could be killed: nothing was resumed"
    sample(*common, f"--out={tmp_path / 'killed.npz'}")
    with np.load(tmp_path / "killed.npz") as f:
        np.testing.assert_array_equal(f["arr_0"], one)
    assert not (tmp_path / "killed.parts").exists()  # a finished run leaves only its .npz
    proc = sample(*common[:-1], "--num-steps=20", f"--out={tmp_path / 'killed.npz'}", wait=False)
    assert proc.wait() != 0 and "killed.npz already exists" in proc.stdout.read()
    (tmp_path / "stopped.parts").mkdir()  # a stopped run's settings, then a command with other ones
    (tmp_path / "stopped.parts" / "settings.json").write_text("{}")
    proc = sample(*common[:-1], "--num-steps=20", f"--out={tmp_path / 'stopped.npz'}", wait=False)
    assert proc.wait() != 0 and "holds batches made with other settings" in proc.stdout.read()


def test_grid_mode_and_released_sit_checkpoints(tiny_checkpoint, tmp_path):
    sample(f"--ckpt={tiny_checkpoint}", "--classes", "3", "7", "--per-class=4", "--num-steps=3", "--cfg-scale=4",
           f"--out={tmp_path / 'grid.png'}")
    from PIL import Image
    assert Image.open(tmp_path / "grid.png").size == (4 * 64, 2 * 64)  # 16px samples shown at 64px
    # A released SiT checkpoint is a bare state dict: the architecture is read off its shapes.
    sit = SiT(patch_size=8, depth=12, hidden_size=384, num_heads=6)  # SiT-S/8, 256px latents
    torch.save(sit.state_dict(), tmp_path / "SiT-S-8.pt")
    loaded = load_model(str(tmp_path / "SiT-S-8.pt"))
    assert model_config(loaded) == model_config(sit)



def test_sample_speed_flags_set_tf32_and_compile_and_old_batches_resume_as_they_were_made(tiny_checkpoint, tmp_path,
                                                                                          monkeypatch):
    import sample as sampler

    compiled = []
    monkeypatch.setattr(SiT, "compile", lambda self, *a, **k: compiled.append(self))
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        grid = [f"--ckpt={tiny_checkpoint}", "--classes", "1", "--per-class=1", "--num-steps=1", "--cfg-scale=1"]
        sampler.main(sampler.parse_args([*grid, f"--out={tmp_path / 'a.png'}"]))
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True) and not compiled
        sampler.main(sampler.parse_args([*grid, "--no-tf32", "--compile", f"--out={tmp_path / 'b.png'}"]))
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
        assert len(compiled) == 1
        # Batches made before --tf32 existed were made without TF32: they continue under --no-tf32 only.
        common = [f"--ckpt={tiny_checkpoint}", "--num-fid-samples=2", "--batch-size=1", "--num-steps=1",
                  f"--out={tmp_path / 'old.npz'}"]
        sampler.check_settings(sampler.parse_args(common), str(tmp_path / "old.parts"), 0, 1)
        settings = tmp_path / "old.parts" / "settings.json"
        was = json.loads(settings.read_text())
        settings.write_text(json.dumps({k: v for k, v in was.items() if k not in sampler.SETTINGS_ADDED}))
        with pytest.raises(SystemExit, match="tf32: False -> True"):
            sampler.check_settings(sampler.parse_args(common), str(tmp_path / "old.parts"), 0, 1)
        sampler.check_settings(sampler.parse_args([*common, "--no-tf32"]), str(tmp_path / "old.parts"), 0, 1)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


#################################################################################
#                 Reference batches from anything; FID while training           #
#################################################################################

def test_make_ref_from_an_image_folder_crops_as_adm_and_from_an_npz_adds_missing_statistics(tmp_path):
    from PIL import Image

    from prepare_imagenet import center_crop

    torch.save(fid.load_inception("random").state_dict(), tmp_path / "inception.pth")
    rng = np.random.default_rng(0)
    (tmp_path / "imgs" / "deeper").mkdir(parents=True)
    sizes = [(40, 30), (33, 33), (64, 20), (20, 48)]
    for i, (w, h) in enumerate(sizes):
        folder = tmp_path / "imgs" / ("deeper" if i % 2 else "")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"not an image")
    inc = f"--inception={tmp_path / 'inception.pth'}"
    fid.main(["--make-ref", str(tmp_path / "imgs"), "--image-size", "16", str(tmp_path / "folder.npz"), inc])
    with np.load(tmp_path / "folder.npz") as f:
        files = sorted([str(tmp_path / "imgs" / "0.png"), str(tmp_path / "imgs" / "2.png"),
                        str(tmp_path / "imgs" / "deeper" / "1.png"), str(tmp_path / "imgs" / "deeper" / "3.png")])
        expected = np.stack([center_crop(Image.open(p).convert("RGB"), 16) for p in files])
        np.testing.assert_array_equal(f["arr_0"], expected)  # every readable image, sorted by path, ADM's crop
        acts = fid.features(fid.load_inception("random"), [expected])
        np.testing.assert_allclose(f["sigma"], np.cov(acts["pool"], rowvar=False), rtol=1e-10, atol=1e-14)
    np.savez(tmp_path / "bare.npz", arr_0=expected)  # images only, as sample.py writes
    fid.main(["--make-ref", str(tmp_path / "bare.npz"), str(tmp_path / "stats.npz"), inc])
    with np.load(tmp_path / "stats.npz") as f, np.load(tmp_path / "folder.npz") as g:
        assert all(np.array_equal(f[k], g[k]) for k in ("arr_0", "mu", "sigma", "mu_s", "sigma_s"))


def test_fid_while_training_is_fid_py_on_sample_py_samples_and_the_same_on_two_ranks(tmp_path):
    import train

    torch.save(fid.load_inception("random").state_dict(), tmp_path / "inception.pth")
    inc = f"--inception={tmp_path / 'inception.pth'}"
    fid.main(["--make-ref", "shapes", "--image-size", "8", "--num", "6", str(tmp_path / "ref.npz"), inc])
    flags = ["--data=shapes", "--image-size=8", "--model=SiT-S/4", "--depth=2", "--hidden-size=32", "--num-heads=2",
             "--precision=fp32", "--global-batch-size=4", "--eval-every=0", "--sample-every=0", "--ckpt-every=2",
             "--max-steps=2", "--fid-every=2", "--fid-samples=5", f"--fid-ref={tmp_path / 'ref.npz'}", inc,
             "--sample-steps=2"]
    train.main(train.parse_args([*flags, f"--results-dir={tmp_path / 'one'}"]))
    logged = [r for r in map(json.loads, open(tmp_path / "one" / "log.jsonl")) if "fid" in r]
    assert [(r["step"], r["fid_samples"]) for r in logged] == [(2, 5)]
    sample("--ckpt=" + str(tmp_path / "one" / "checkpoints" / "0000002.pt"), "--num-fid-samples=5", "--batch-size=5",
           "--num-steps=2", "--cfg-scale=1", f"--out={tmp_path / 'samples.npz'}")
    metrics = fid.evaluate(str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz"), fid.load_inception("random"))
    assert logged[0]["fid"] == pytest.approx(metrics["fid"], rel=1e-6)
    assert logged[0]["inception_score"] == pytest.approx(metrics["inception_score"], rel=1e-6)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", *flags, f"--results-dir={tmp_path / 'two'}"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    two = [r for r in map(json.loads, open(tmp_path / "two" / "log.jsonl")) if "fid" in r]
    assert two[0]["fid"] == pytest.approx(logged[0]["fid"], rel=1e-3)  # 3 + 2 samples per rank, not 5 in one batch


def test_fid_while_training_refuses_a_reference_it_cannot_use_before_any_step(tmp_path):
    import train

    np.savez(tmp_path / "bare.npz", arr_0=np.zeros((6, 8, 8, 3), np.uint8))
    big = dict(mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    np.savez(tmp_path / "big.npz", arr_0=np.zeros((6, 16, 16, 3), np.uint8), **big)
    base = ["--data=shapes", "--image-size=8", "--model=SiT-S/4", "--depth=2", "--hidden-size=32", "--num-heads=2",
            "--max-steps=1", "--fid-every=1", "--inception=random"]
    for ref, message in (("bare.npz", "has no statistics (mu, sigma): add them once with python fid.py --make-ref"),
                         ("big.npz", "holds 16x16 images and this run's samples are 8x8")):
        with pytest.raises(SystemExit, match=message.replace("(", "\\(").replace(")", "\\)")):
            train.main(train.parse_args([*base, f"--fid-ref={tmp_path / ref}", f"--results-dir={tmp_path / 'run'}"]))
        assert not (tmp_path / "run").exists()  # refused before the run directory is made
    with pytest.raises(SystemExit):
        train.parse_args(base)  # --fid-every without --fid-ref
