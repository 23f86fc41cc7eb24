"""Tests of train.py, data.py and repa.py on the CPU, with tiny models and the toy data."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import repa
from data import LATENT_SCALE, Latents, Shapes, write_manifest
from checkpoint import load_checkpoint, load_model
from model import SiT
from sample import main as sample_main, parse_args as sample_args
from train import Trainee, init_from, main, parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, where the scripts are

TINY = ["--model=SiT-S/4", "--depth=2", "--hidden-size=32", "--num-heads=2", "--precision=fp32", "--lr=1e-3"]


def train(tmp_path, *extra, name="run", data="--data=shapes", steps=6):
    args = parse_args([data, *TINY, "--global-batch-size=8", f"--max-steps={steps}", "--log-every=1",
                       "--eval-every=0", "--sample-every=0", "--ckpt-every=3", f"--results-dir={tmp_path / name}",
                       *extra])
    main(args)
    return read_log(tmp_path / name)


def read_log(run_dir):
    with open(run_dir / "log.jsonl") as f:
        return [json.loads(line) for line in f]


def losses(log):
    return [r["loss"] for r in log if "loss" in r]


#################################################################################
#                                  The loop                                     #
#################################################################################

def test_training_reduces_the_loss(tmp_path):
    log = train(tmp_path, "--routing=dynamic", "--chunk=2", "--image-size=16", "--lr=3e-3", "--eval-every=10",
                "--eval-samples=32", steps=60)
    evals = [r for r in log if "eval_loss" in r]  # fixed t grid and noise: low variance, unlike the step losses
    assert len(evals) == 6 and len(evals[0]["eval_loss_by_t"]) == 8
    curve = [r["eval_loss"] for r in evals]
    assert all(a > b for a, b in zip(curve, curve[1:])) and curve[-1] < 0.8 * curve[0]
    assert np.mean(losses(log)[-10:]) < np.mean(losses(log)[:10])


def test_resume_repeats_the_uninterrupted_run_exactly(tmp_path):
    full = losses(train(tmp_path, "--routing=explicit", name="full"))
    assert len(losses(train(tmp_path, "--routing=explicit", name="split", steps=3))) == 3
    ckpt = tmp_path / "split" / "checkpoints" / "0000003.pt"
    # The resumed run appends steps 4-6 to the same log; bit-identical losses, not merely close ones.
    assert losses(train(tmp_path, "--routing=explicit", f"--resume={ckpt}", name="split")) == full


def test_resume_refuses_other_settings_and_results_dirs_are_not_overwritten(tmp_path):
    train(tmp_path, steps=3)
    with pytest.raises(SystemExit, match="already holds checkpoints"):
        train(tmp_path, steps=3)
    with pytest.raises(SystemExit, match="other settings"):
        train(tmp_path, "--resume=latest", "--seed=1", steps=6)


def test_checkpoint_describes_itself_and_round_trips(tmp_path):
    train(tmp_path, "--routing=static", steps=3)
    path = str(tmp_path / "run" / "checkpoints" / "0000003.pt")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert {"config", "args", "step", "model", "ema", "opt", "rng", "data"} <= ckpt.keys() and ckpt["step"] == 3
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in list(ckpt["model"]) + list(ckpt["ema"]))
    assert not os.path.exists(path + ".tmp")
    model = load_model(path).eval()
    assert model.config.routing == "static" and model.config.depth == 2
    x, t, y = torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([0, 1])
    reference = SiT(**ckpt["config"]).eval()
    reference.load_state_dict(ckpt["ema"])
    assert torch.equal(model(x, t, y), reference(x, t, y))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="the loss is (nan|inf)|a gradient is not finite"):
        train(tmp_path, "--lr=1e30", "--ckpt-every=1", steps=50)
    kept = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    assert kept and len(kept) < 50
    for name in kept:
        ckpt = load_checkpoint(str(tmp_path / "run" / "checkpoints" / name))
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_resume_picks_the_highest_readable_step_and_refuses_bad_state_and_other_runs(tmp_path, capsys):
    train(tmp_path, steps=6)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    (ckpt_dir / "best.pt").write_bytes((ckpt_dir / "0000003.pt").read_bytes())  # not a step: never "latest"
    (ckpt_dir / "0000006.pt").write_bytes(b"half-written garbage")
    log = train(tmp_path, "--resume=latest", steps=6)
    out = capsys.readouterr().out
    assert f"skipping {ckpt_dir / '0000006.pt'}" in out and f"resumed from {ckpt_dir / '0000003.pt'} at step 3" in out
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]  # steps 4-6 logged once, not twice

    ckpt = load_checkpoint(str(ckpt_dir / "0000006.pt"))
    ckpt["ema"]["pos_embed"][0, 0, 0] = float("inf")
    torch.save(ckpt, ckpt_dir / "0000009.pt")
    with pytest.raises(SystemExit, match="0000009.pt holds non-finite values"):
        train(tmp_path, "--resume=latest", steps=12)

    train(tmp_path, name="other", steps=3)
    before = {p: p.read_bytes() for p in (tmp_path / "other").rglob("*") if p.is_file()}
    with pytest.raises(SystemExit, match="not a checkpoint of the run"):
        train(tmp_path, f"--resume={ckpt_dir / '0000003.pt'}", name="other", steps=6)
    assert {p: p.read_bytes() for p in (tmp_path / "other").rglob("*") if p.is_file()} == before


def test_bad_flags_say_what_to_do(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--data=shapes", "--data-path=x"])
    assert "exactly one of --data-path" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(TINY)  # no data: only --bench may go without
    assert "exactly one of --data-path" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="prepare_imagenet.py"):
        train(tmp_path, data=f"--data-path={tmp_path / 'missing'}")
    with pytest.raises(SystemExit, match="must divide"):
        train(tmp_path, "--micro-batch-size=3")


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, kernel):
    """With kernel=triton the two DDP processes (gloo) run the fused kernel, whose backward accumulates each
    source's gradient over its readers in place, against one process on the reference path. The held-out loss,
    split over the ranks, is compared with kernel=torch only: under Triton's interpreter its 16 forward passes
    cost about 18 s and test no more of the kernel than the step does."""
    if kernel == "triton" and not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("the fused kernel needs a GPU or TRITON_INTERPRET=1")
    held_out = ["--eval-every=1", "--eval-samples=8"] if kernel == "torch" else ["--eval-every=0"]
    common = ["--data=shapes", *TINY, "--image-size=8", "--routing=dynamic", "--chunk=2", "--global-batch-size=8",
              "--max-steps=1", "--log-every=1", *held_out, "--sample-every=0",
              "--ckpt-every=1"]  # one step: its weights and held-out loss follow from the summed gradients
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = [sys.executable, "train.py", *common, "--micro-batch-size=4", "--kernel=torch",
           f"--results-dir={tmp_path / 'one'}"]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *common,
           f"--kernel={kernel}", f"--results-dir={tmp_path / 'two'}"]
    for cmd in (one, two):
        subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True)
    log1, log2 = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    # Same draws and data; only the order in which the two halves' gradients are summed differs (and, for the
    # kernel, the order of its fp32 sums).
    np.testing.assert_allclose(losses(log2), losses(log1), rtol=1e-5)
    e1, e2 = ([r["eval_loss"] for r in log if "eval_loss" in r] for log in (log1, log2))
    assert len(e1) == (kernel == "torch")
    np.testing.assert_allclose(e2, e1, rtol=1e-5)
    w1, w2 = (load_checkpoint(str(tmp_path / run / "checkpoints" / "0000001.pt"))["model"] for run in ("one", "two"))
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-6, msg=name)


#################################################################################
#                          Starting from other weights                          #
#################################################################################

@pytest.mark.parametrize("routing", ["residual", "static", "explicit", "dynamic"])
def test_init_from_a_residual_checkpoint(tmp_path, routing):
    kw = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=5)
    torch.manual_seed(0)
    sit = SiT(**kw)
    with torch.no_grad():
        for p in sit.parameters():
            p.add_(torch.randn_like(p))
    torch.save(sit.state_dict(), tmp_path / "sit.pt")  # a released SiT checkpoint is a bare state dict
    model = SiT(**kw, routing=routing)
    init_from(model, str(tmp_path / "sit.pt"))
    state = model.state_dict()
    for k, v in sit.state_dict().items():
        assert torch.equal(state[k], v), k
    if routing != "residual":
        for name, router in model.routers.items():
            assert torch.count_nonzero(router.w if routing != "dynamic" else router.W_q.weight) == 0, name
            assert torch.equal(router.gamma, torch.ones_like(router.gamma)), name


def test_init_from_a_checkpoint_with_another_class_count_starts_the_label_table_fresh(tmp_path, capsys):
    kw = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2)
    torch.manual_seed(0)
    theirs = SiT(**kw, num_classes=1000)
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p))
    torch.save(theirs.state_dict(), tmp_path / "sit.pt")
    for classes, dropout in ((10, 0.1), (1, 0.0)):  # another count; one class and no null class (unconditional)
        torch.manual_seed(1)
        model = SiT(**kw, num_classes=classes, class_dropout_prob=dropout)
        table = model.y_embedder.embedding_table.weight.detach().clone()
        init_from(model, str(tmp_path / "sit.pt"))
        said = capsys.readouterr().out
        assert f"its label table has 1001 rows and this model's {classes + (dropout > 0)}" in said
        assert "the label table starts fresh" in said
        state = model.state_dict()
        assert torch.equal(state["y_embedder.embedding_table.weight"], table)
        for k, v in theirs.state_dict().items():
            assert k == "y_embedder.embedding_table.weight" or torch.equal(state[k], v), k


def test_class_dropout_reaches_the_draws_and_zero_leaves_no_null_class(tmp_path, monkeypatch):
    import data

    seen = []
    draw = data.Stream.draw
    monkeypatch.setattr(data.Stream, "draw", lambda self, step, p: seen.append(p) or draw(self, step, p))
    train(tmp_path, "--class-dropout=0.3", name="some", steps=1)
    assert seen == [0.3]
    train(tmp_path, "--class-dropout=0", name="none", steps=3)
    model = load_model(str(tmp_path / "none" / "checkpoints" / "0000003.pt"))
    assert model.config.class_dropout_prob == 0 and model.y_embedder.embedding_table.num_embeddings == 10
    with pytest.raises(SystemExit, match="trained without a null class .* use --cfg-scale=1, not 1.5"):
        sample_main(sample_args([f"--ckpt={tmp_path / 'none' / 'checkpoints' / '0000003.pt'}",
                                 f"--out={tmp_path / 'grid.png'}", "--num-steps=2", "--per-class=1"]))
    sample_main(sample_args([f"--ckpt={tmp_path / 'none' / 'checkpoints' / '0000003.pt'}",
                             f"--out={tmp_path / 'grid.png'}", "--num-steps=2", "--per-class=1", "--cfg-scale=1"]))
    assert (tmp_path / "grid.png").exists()


def test_unconditional_training_sees_one_class_and_samples_without_guidance(tmp_path, monkeypatch):
    labels = []
    forward = SiT.forward
    monkeypatch.setattr(SiT, "forward", lambda self, x, t, y, *a, **k: labels.append(y.clone())
                        or forward(self, x, t, y, *a, **k))
    train(tmp_path, "--unconditional", "--sample-every=3", "--sample-steps=2", "--image-size=8", steps=3)
    model = load_model(str(tmp_path / "run" / "checkpoints" / "0000003.pt"))
    assert model.config.num_classes == 1 and model.y_embedder.embedding_table.num_embeddings == 1
    real = [y for y in labels if y.device.type == "cpu"]  # not the FLOP count's forward on the meta device
    assert torch.cat(real).unique().tolist() == [0]  # training, held-out and sample-grid labels alike
    assert (tmp_path / "run" / "samples" / "0000003.png").exists()
    with pytest.raises(SystemExit):
        parse_args(["--data=shapes", "--unconditional", "--class-dropout=0.1"])


#################################################################################
#                                 Data and REPA                                 #
#################################################################################

def make_latent_dir(path, n=24, images=True, seed=0, size=256):
    rng = np.random.default_rng(seed)
    os.makedirs(path)
    shards = []
    for k, count in enumerate((n // 2, n - n // 2)):
        shard = path / f"shard-{k:05d}"
        os.makedirs(shard)
        moments = rng.standard_normal((count, 2, 2, 4, size // 8, size // 8)).astype(np.float16)
        moments[:, :, 1] = np.abs(moments[:, :, 1]) * 0.1  # std > 0
        np.save(shard / "moments.npy", moments)
        np.save(shard / "labels.npy", rng.integers(0, 7, count).astype(np.int64))
        if images:
            np.save(shard / "images.npy", rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8))
        shards.append(dict(name=shard.name, count=count))
    write_manifest(str(path), dict(count=n, num_classes=7, classes=[f"c{i}" for i in range(7)], image_size=size,
                                   latent_shape=[4, size // 8, size // 8], latent_dtype="float16", vae="test",
                                   images=images,
                                   shards=shards))


def test_latents_draw_posterior_samples_and_flip_images_alike(tmp_path):
    make_latent_dir(tmp_path / "lat")
    data = Latents(str(tmp_path / "lat"), num_eval=4)
    assert len(data.train) == 20 and len(data.eval) == 4 and not set(data.train) & set(data.eval)
    idx = np.array([3, 15])  # one from each shard
    noise = torch.randn(2, 4, 32, 32)
    x, y, images = data.batch(idx, flip=torch.tensor([False, True]), noise=noise, images=True)
    raw = np.concatenate([np.load(tmp_path / "lat" / s / "moments.npy") for s in ("shard-00000", "shard-00001")])
    pixels = np.concatenate([np.load(tmp_path / "lat" / s / "images.npy") for s in ("shard-00000", "shard-00001")])
    for b, (i, f) in enumerate(zip(idx, (0, 1))):
        mean, std = torch.from_numpy(raw[i, f].astype(np.float32))
        torch.testing.assert_close(x[b], (mean + std * noise[b]) * LATENT_SCALE)
    assert torch.equal(images[0], torch.from_numpy(pixels[3]))
    assert torch.equal(images[1], torch.from_numpy(pixels[15][:, ::-1].copy()))
    labels = np.concatenate([np.load(tmp_path / "lat" / s / "labels.npy") for s in ("shard-00000", "shard-00001")])
    assert y.tolist() == labels[idx].tolist()


def test_training_on_a_latent_directory(tmp_path):
    make_latent_dir(tmp_path / "lat", images=False)
    log = train(tmp_path, "--image-size=256", "--eval-samples=4", "--eval-every=3",
                data=f"--data-path={tmp_path / 'lat'}", steps=3)
    assert len(losses(log)) == 3 and all(np.isfinite(losses(log)))
    assert load_model(str(tmp_path / "run" / "checkpoints" / "0000003.pt")).config.in_channels == 4


def official_dinov2_shapes():
    """Key -> shape of dinov2_vitb14_pretrain.pth (the official file's names)."""
    d, shapes = 768, {"cls_token": (1, 1, 768), "pos_embed": (1, 1370, 768), "mask_token": (1, 768),
                      "patch_embed.proj.weight": (768, 3, 14, 14), "patch_embed.proj.bias": (768,),
                      "norm.weight": (768,), "norm.bias": (768,)}
    for i in range(12):
        b = f"blocks.{i}"
        for name, shape in {"norm1": (d,), "norm2": (d,), "attn.proj": (d, d), "attn.qkv": (3 * d, d),
                            "mlp.fc1": (4 * d, d), "mlp.fc2": (d, 4 * d)}.items():
            shapes[f"{b}.{name}.weight"], shapes[f"{b}.{name}.bias"] = shape, (shape[0],)
        shapes[f"{b}.ls1.gamma"] = shapes[f"{b}.ls2.gamma"] = (d,)
    return shapes


def test_dinov2_has_the_official_keys_and_resamples_to_256_tokens(tmp_path):
    encoder = repa.DINOv2()
    assert {k: tuple(v.shape) for k, v in encoder.state_dict().items()} == official_dinov2_shapes()
    assert len(encoder.state_dict()) == 175 and sum(p.numel() for p in encoder.parameters()) == 86_580_480
    torch.save(encoder.state_dict(), tmp_path / "dinov2.pt")
    loaded = repa.load_encoder(str(tmp_path / "dinov2.pt"))  # strict loading of an official-format file
    images = torch.randint(0, 256, (2, 256, 256, 3), dtype=torch.uint8)
    assert loaded(repa.preprocess(images)).shape == (2, 256, 768)


def test_repa_trains_with_an_encoder_of_the_real_architecture(tmp_path):
    log = train(tmp_path, "--repa", "--repa-encoder=random", "--model=SiT-S/2", "--routing=dynamic",
                "--global-batch-size=4", "--repa-depth=1", steps=2)
    assert all(-1 <= r["repa_loss"] <= 1 for r in log)
    ckpt = load_checkpoint(str(tmp_path / "run" / "checkpoints" / "0000002.pt"))
    assert ckpt["config"]["final_agg"] == "reuse" and ckpt["projector"]["4.weight"].shape == (768, 2048)


def test_repa_at_512px_aligns_32x32_tokens_and_refuses_a_model_with_another_count(tmp_path, capsys):
    make_latent_dir(tmp_path / "in512", n=6, size=512)
    data = f"--data-path={tmp_path / 'in512'}"
    flags = ("--repa", "--repa-encoder=random", "--repa-depth=1", "--global-batch-size=2", "--depth=1", "--chunk=2",
             "--eval-samples=2")
    with pytest.raises(SystemExit, match="DINOv2's 32 x 32 patch tokens of 512px images, but this model has 256 "
                                         "tokens: use a SiT-\\*/2 model on these 64 x 64 inputs"):
        train(tmp_path, *flags, name="patch4", data=data, steps=1)  # TINY's SiT-S/4
    log = train(tmp_path, *flags, "--model=SiT-S/2", name="run", data=data, steps=1)
    assert -1 <= log[-1]["repa_loss"] <= 1
    assert repa.preprocess(torch.zeros(1, 512, 512, 3, dtype=torch.uint8)).shape == (1, 3, 448, 448)


def test_repa_projector_starts_as_in_repa_xavier_uniform_with_zero_biases():
    torch.manual_seed(0)
    mlp = repa.projector(1152)
    assert [tuple(m.weight.shape) for m in mlp[::2]] == [(2048, 1152), (2048, 2048), (768, 2048)]
    for layer in mlp[::2]:
        fan_out, fan_in = layer.weight.shape
        bound = (6 / (fan_in + fan_out)) ** 0.5  # Xavier-uniform's, not nn.Linear's default 1 / sqrt(fan_in)
        assert torch.count_nonzero(layer.bias) == 0
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.99 * bound
        assert abs(layer.weight.std().item() - bound / 3 ** 0.5) < 0.01 * bound


@pytest.mark.parametrize("routing", ["residual", "dynamic"])
def test_sample_grids_come_with_a_routing_map_for_dar(tmp_path, routing):
    train(tmp_path, f"--routing={routing}", "--image-size=16", "--sample-every=2", "--sample-steps=1", steps=2)
    samples = tmp_path / "run" / "samples"
    assert (samples / "0000002.png").exists()
    assert (samples / "0000002_routing.png").exists() == (routing != "residual")
    if routing != "residual":
        from PIL import Image
        width, height = Image.open(samples / "0000002_routing.png").size
        assert width > 3 * 5 * 22 and height > 5 * 14  # three panels of 5 aggregators x 5 sources (depth 2)


def test_alignment_loss_is_the_negative_mean_cosine():
    a, b = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    cos = (a / a.norm(dim=-1, keepdim=True) * b / b.norm(dim=-1, keepdim=True)).sum(-1)
    torch.testing.assert_close(repa.alignment_loss(a, b), -cos.mean())
    assert repa.alignment_loss(a, 3 * a).item() == pytest.approx(-1.0)


def test_shapes_are_deterministic_and_the_splits_disjoint():
    data = Shapes(num_train=100, num_eval=10)
    a, la = data.images([5, 7, 105])
    b, lb = Shapes(num_train=100, num_eval=10).images([5, 7, 105])
    assert np.array_equal(a, b) and np.array_equal(la, lb) and a.shape == (3, 32, 32, 3)
    assert not set(data.train) & set(data.eval)
    assert set(Shapes().images(range(200))[1]) == set(range(10))


def test_shapes_are_light_figures_on_dark_ground_near_the_middle():
    images, _ = Shapes().images(range(100))
    corners = images[:, [0, 0, -1, -1], [0, -1, 0, -1]]  # (n, 4 corners, 3)
    assert (corners < 96).all(), "the background is dark in every channel"
    light = (images >= 160).all(-1)  # pixels of the pure foreground colour
    assert light.any((1, 2)).all(), "every image has a light figure"
    ys, xs = np.mgrid[:32, :32]
    offsets = np.array([max(abs(ys[m].mean() - 15.5), abs(xs[m].mean() - 15.5)) for m in light])
    # A half disk's or crescent's centroid lies off its centre; shapes placed anywhere in the frame (the
    # earlier data) average about 3 pixels off the middle.
    assert offsets.max() < 9 and offsets.mean() < 2.5, (offsets.max(), offsets.mean())


def test_bench_prints_a_table(tmp_path, capsys):
    main(parse_args(["--data=shapes", *TINY, "--global-batch-size=4", "--bench", f"--results-dir={tmp_path}"]))
    out = capsys.readouterr().out
    assert "| step s | images/s |" in out and "| CPU | SiT-S/4 |" in out


def test_bench_without_data_times_random_latents_of_imagenet_shape(tmp_path, capsys, monkeypatch):
    shapes = []
    forward = SiT.forward
    monkeypatch.setattr(SiT, "forward", lambda self, x, t, y, *a, **k: shapes.append((x.shape, int(y.max())))
                        or forward(self, x, t, y, *a, **k))
    main(parse_args([*TINY, "--global-batch-size=4", "--bench", "--image-size=64", f"--results-dir={tmp_path}"]))
    assert "| CPU | SiT-S/4 |" in capsys.readouterr().out
    assert shapes and all(s == (4, 4, 8, 8) and y <= 1000 for s, y in shapes)  # 1000: the null class


def test_repa_state_summary_aligns_block_ks_mlp_output_and_aggregate_its_successors_input():
    torch.manual_seed(0)
    model = SiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=3, num_heads=2, num_classes=10,
                routing="static", chunk=2)
    for p_ in model.parameters():  # away from the zero init, so that every sublayer output differs
        p_.data.add_(0.05 * torch.randn_like(p_))
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 4])
    seen = {}
    model.blocks[1].mlp.register_forward_hook(lambda m, i, out: seen.update(f=out))
    summary = Trainee(model, nn.Identity(), repa_depth=2, repa_state="summary")(x, t, y)[1]
    gate = model.blocks[1].modulations(model.t_embedder(t) + model.y_embedder(y))[1][2]
    torch.testing.assert_close(summary, gate.unsqueeze(1) * seen["f"])  # v_4 = gate * MLP(x) of block 2
    aggregate = Trainee(model, nn.Identity(), repa_depth=2)(x, t, y)[1]
    torch.testing.assert_close(aggregate, model(x, t, y, return_states=True)[1]["z"][1])
    assert not torch.allclose(summary, aggregate)
    with pytest.raises(SystemExit):  # 2 x 1 is no multiple of chunk 4: v_2 is no chunk summary
        parse_args(["--data=shapes", "--repa", "--repa-state=summary", "--repa-depth=1", "--chunk=4"])
    assert parse_args(["--data=shapes", "--repa"]).grad_clip == 1.0  # REPA's max_grad_norm
    assert parse_args(["--data=shapes"]).grad_clip == 0.0


#################################################################################
#                    Recipe knobs (REPA, LightningDiT); EMA                     #
#################################################################################

def test_recipe_defaults_are_the_papers():
    args = parse_args(["--data=shapes"])
    assert (args.warmup_steps, args.weight_decay, args.adam_betas, args.t_sampling) == (0, 0.0, [0.9, 0.999],
                                                                                         "uniform")


def test_warm_up_betas_and_weight_decay_reach_the_optimiser_and_a_resume_continues_the_ramp(tmp_path):
    knobs = ("--warmup-steps=4", "--weight-decay=0.05", "--adam-betas", "0.8", "0.95")
    full = losses(train(tmp_path, *knobs, name="full"))
    for step, lr in ((3, 1e-3 * 3 / 4), (6, 1e-3)):  # the rate of the last step taken: 3 of 4 warm-up steps, then lr
        group = load_checkpoint(str(tmp_path / "full" / "checkpoints" / f"{step:07d}.pt"))["opt"]["param_groups"][0]
        assert group["lr"] == pytest.approx(lr) and group["weight_decay"] == 0.05
        assert tuple(group["betas"]) == (0.8, 0.95)
    train(tmp_path, *knobs, name="split", steps=3)
    assert losses(train(tmp_path, *knobs, "--resume=latest", name="split")) == full
    assert losses(train(tmp_path, name="plain"))[1:] != full[1:]  # step 1 differs only by its rate's scale


def test_t_is_uniform_by_default_and_logit_normal_on_request():
    from data import Stream

    data = Shapes(size=4, seed=0, num_train=512, num_eval=8)
    uniform = Stream(data, 512, 3, torch.device("cpu")).draw(5, 0.1)["t"]
    torch.testing.assert_close(uniform, torch.rand(512, generator=torch.Generator().manual_seed(3 * 1_000_003 + 5)),
                               rtol=0, atol=0)  # the draw every earlier run made
    stream = Stream(data, 512, 3, torch.device("cpu"), lognormal=(0.5, 0.8))
    t = torch.cat([stream.draw(s, 0.1)["t"] for s in range(20)])
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean() - 0.5) < 0.03 and abs(logit.std() - 0.8) < 0.03 and 0 < t.min() and t.max() < 1


def test_the_t_sampling_flag_reaches_the_draws(tmp_path):
    uniform = losses(train(tmp_path, name="uniform", steps=2))
    assert losses(train(tmp_path, "--t-sampling=lognormal", "--t-lognormal", "0", "1", name="lognormal", steps=2)) \
        != uniform


def test_ema_update_is_a_lerp_of_every_parameter_and_buffer():
    from train import update_ema

    torch.manual_seed(0)
    model = SiT(input_size=8, patch_size=4, in_channels=3, hidden_size=16, depth=2, num_heads=2, num_classes=10,
                routing="dynamic", chunk=2)
    ema = SiT(input_size=8, patch_size=4, in_channels=3, hidden_size=16, depth=2, num_heads=2, num_classes=10,
              routing="dynamic", chunk=2)
    for p_ in [*model.parameters(), *model.buffers()]:
        p_.data.normal_()
    expected = {k: e.clone().lerp_(p_, 1 - 0.99) for (k, e), p_ in zip(ema.state_dict().items(),
                                                                      model.state_dict().values())}
    update_ema(ema, model, 0.99)
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0, msg=k)
    assert any("pos_embed" in k for k in expected)  # a buffer, averaged too


#################################################################################
#                               Watching a run                                  #
#################################################################################

def test_a_run_draws_its_training_curves_and_diagnose_redraws_any_log(tmp_path, capsys):
    from PIL import Image

    import diagnose

    train(tmp_path, "--eval-every=2", "--eval-samples=8", steps=4)
    assert Image.open(tmp_path / "run" / "curves.png").size == (640, 420)  # one panel: training and held-out loss
    log = tmp_path / "log.jsonl"  # a log with FID and IS, and a last line cut short by a kill
    lines = [dict(step=s, loss=1.0 / s) for s in (1, 2, 3)] + [dict(step=2, fid=50.0, inception_score=3.0),
                                                             dict(step=3, fid=40.0, inception_score=3.5)]
    log.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "lo')
    diagnose.main(diagnose.parse_args([f"--log={log}"]))
    assert f"training curves in {tmp_path / 'curves.png'}" in capsys.readouterr().out
    assert Image.open(tmp_path / "curves.png").size == (640, 3 * 420)  # loss, FID, IS
    log.write_text(json.dumps(dict(step=0, resumed={})) + "\n")
    diagnose.main(diagnose.parse_args([f"--log={log}", f"--out={tmp_path / 'empty.png'}"]))
    assert "has no loss logged yet" in capsys.readouterr().out and not (tmp_path / "empty.png").exists()


def test_tensorboard_is_optional_and_gets_every_number(tmp_path, capsys, monkeypatch):
    import importlib
    import types

    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: (_ for _ in ()).throw(ImportError(name))
                        if name == "torch.utils.tensorboard" else real(name, *a))
    with pytest.raises(SystemExit):
        parse_args(["--data=shapes", "--tensorboard"])
    assert "--tensorboard needs the tensorboard package, which is optional: pip install tensorboard" in \
        capsys.readouterr().err
    monkeypatch.setattr(importlib, "import_module", real)
    scalars = []

    class Writer:  # what torch.utils.tensorboard.SummaryWriter offers, as far as train.py uses it
        def __init__(self, folder):
            scalars.append(folder)

        def add_scalar(self, key, value, step):
            scalars.append((key, step))

        def flush(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    train(tmp_path, "--tensorboard", "--eval-every=2", "--eval-samples=8", steps=2)
    assert scalars[0] == str(tmp_path / "run" / "tensorboard")
    assert {("loss", 1), ("grad_norm", 2), ("eval_loss", 2), ("eval_loss_ema", 2)} <= set(scalars[1:])


#################################################################################
#                                Reading ahead                                  #
#################################################################################

def test_prefetching_changes_no_number_of_a_run(tmp_path):
    train(tmp_path, "--prefetch=0", "--routing=dynamic", name="in_step", steps=4)
    train(tmp_path, "--prefetch=3", "--routing=dynamic", name="ahead", steps=4)
    a, b = (load_checkpoint(str(tmp_path / n / "checkpoints" / "0000003.pt")) for n in ("in_step", "ahead"))
    assert all(torch.equal(a[k][name], b[k][name]) for k in ("model", "ema") for name in a[k])


def test_the_prefetcher_hands_on_each_step_in_order_and_raises_the_threads_error_at_its_step():
    import threading

    from data import Prefetcher

    def make(step):
        if step == 4:
            raise OSError("shard-00004: input/output error")
        return step * step

    with Prefetcher(make, 2, 10, depth=2) as batches:
        assert [batches.get(s) for s in (2, 3)] == [4, 9]
        with pytest.raises(OSError, match="shard-00004"):
            batches.get(4)
    with Prefetcher(make, 0, 1000, depth=2) as batches:
        assert batches.get(0) == 0
        with pytest.raises(RuntimeError, match="must ask for the steps in order"):
            batches.get(5)
    assert not any(t.name == "prefetch" for t in threading.enumerate())  # leaving the context stops the thread
    assert Prefetcher(make, 0, 10, depth=0).get(3) == 9  # depth 0: made on demand


def test_bench_on_prepared_latents_compares_reading_ahead_with_reading_in_the_step(tmp_path, capsys):
    make_latent_dir(tmp_path / "lat", n=12, images=False)
    main(parse_args([f"--data-path={tmp_path / 'lat'}", *TINY, "--global-batch-size=4", "--bench", "--bench-steps=2",
                     "--eval-samples=4", "--prefetch=2", f"--results-dir={tmp_path / 'b'}"]))
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("loader: ") and "batches/s alone; step " in out[0] and "--prefetch=2" in out[0]
    assert out[-1].startswith("| CPU | SiT-S/4 |")  # the row tools/gpu_check.py reads stays the last line
