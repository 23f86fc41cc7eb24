"""Tests of vae.py and prepare_imagenet.py on the CPU: the VAE's architecture against the public key list and an
independent functional forward pass, ADM's crop, and preparation end to end (bad files, resumption, torchrun)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from data import Latents
from checkpoint import load_checkpoint
from prepare_imagenet import center_crop
from train import main as train_main, parse_args as train_args
from vae import AutoencoderKL, load_vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, where the scripts are
NOTES = os.path.join(ROOT, "..", "shared", "notes", "vae-keys.txt")


#################################################################################
#                                    The VAE                                    #
#################################################################################

def public_vae_shapes():
    """Key -> shape of sd-vae-ft-ema in diffusers' current names (as the released files hold them), built from the
    layout the notes describe: 248 tensors."""
    shapes = {}

    def conv(name, cin, cout, k=3):
        shapes[name + ".weight"], shapes[name + ".bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        shapes[name + ".weight"] = shapes[name + ".bias"] = (c,)

    def resnet(name, cin, cout):
        norm(name + ".norm1", cin), conv(name + ".conv1", cin, cout), norm(name + ".norm2", cout)
        conv(name + ".conv2", cout, cout)
        if cin != cout:
            conv(name + ".conv_shortcut", cin, cout, 1)

    def mid(name):
        resnet(name + ".resnets.0", 512, 512), resnet(name + ".resnets.1", 512, 512)
        norm(name + ".attentions.0.group_norm", 512)
        for layer in ("to_q", "to_k", "to_v", "to_out.0"):
            shapes[f"{name}.attentions.0.{layer}.weight"], shapes[f"{name}.attentions.0.{layer}.bias"] = (512, 512), (512,)

    conv("encoder.conv_in", 3, 128)
    cin = 128
    for i, c in enumerate((128, 256, 512, 512)):
        resnet(f"encoder.down_blocks.{i}.resnets.0", cin, c), resnet(f"encoder.down_blocks.{i}.resnets.1", c, c)
        if i < 3:
            conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", c, c)
        cin = c
    mid("encoder.mid_block"), norm("encoder.conv_norm_out", 512), conv("encoder.conv_out", 512, 8)
    conv("quant_conv", 8, 8, 1), conv("post_quant_conv", 4, 4, 1)
    conv("decoder.conv_in", 4, 512), mid("decoder.mid_block")
    cin = 512
    for i, c in enumerate((512, 512, 256, 128)):
        for j in range(3):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", cin if j == 0 else c, c)
        if i < 3:
            conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", c, c)
        cin = c
    norm("decoder.conv_norm_out", 128), conv("decoder.conv_out", 128, 3)
    return shapes


def test_vae_has_the_public_checkpoints_keys_and_maps_256px_to_32px_latents_and_back():
    vae = load_vae("random")
    state = vae.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == public_vae_shapes()
    assert len(state) == 248 and sum(v.numel() for v in state.values()) == 83_653_863
    with torch.no_grad():
        mean, std = vae.encode(torch.rand(1, 3, 256, 256) * 2 - 1)
        assert mean.shape == std.shape == (1, 4, 32, 32) and (std > 0).all()
        assert vae.decode(mean).shape == (1, 3, 256, 256)


def functional_vae(sd, x):
    """The kl-f8 encoder and decoder as CompVis' LDM code structures them (1x1-conv attention with an explicit
    softmax; the decoder walks its levels from the deepest, LDM's up[3] being diffusers' up_blocks.0), read
    from a state dict. Returns (posterior mean, std, decoding of the mean)."""
    gn = lambda x, p: F.group_norm(x, 32, sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)
    conv = lambda x, p, **kw: F.conv2d(x, sd[p + ".weight"], sd[p + ".bias"], **kw)
    conv1x1 = lambda x, p: F.conv2d(x, sd[p + ".weight"][:, :, None, None], sd[p + ".bias"])

    def resnet(x, p):
        h = conv(F.silu(gn(x, p + ".norm1")), p + ".conv1", padding=1)
        h = conv(F.silu(gn(h, p + ".norm2")), p + ".conv2", padding=1)
        return (conv(x, p + ".conv_shortcut") if p + ".conv_shortcut.weight" in sd else x) + h

    def attention(x, p):
        B, C, H, W = x.shape
        h = gn(x, p + ".group_norm")
        q, k, v = (conv1x1(h, p + n).reshape(B, C, H * W) for n in (".to_q", ".to_k", ".to_v"))
        w = torch.softmax(torch.bmm(q.transpose(1, 2), k) * C ** -0.5, dim=2)  # (B, query, key)
        h = torch.bmm(v, w.transpose(1, 2)).reshape(B, C, H, W)
        return x + conv1x1(h, p + ".to_out.0")

    def mid(x, p):
        return resnet(attention(resnet(x, p + ".resnets.0"), p + ".attentions.0"), p + ".resnets.1")

    h = conv(x, "encoder.conv_in", padding=1)
    for i in range(4):
        h = resnet(resnet(h, f"encoder.down_blocks.{i}.resnets.0"), f"encoder.down_blocks.{i}.resnets.1")
        if i < 3:
            h = conv(F.pad(h, (0, 1, 0, 1)), f"encoder.down_blocks.{i}.downsamplers.0.conv", stride=2)
    h = conv(F.silu(gn(mid(h, "encoder.mid_block"), "encoder.conv_norm_out")), "encoder.conv_out", padding=1)
    mean, logvar = conv(h, "quant_conv").chunk(2, dim=1)
    h = mid(conv(conv(mean, "post_quant_conv"), "decoder.conv_in", padding=1), "decoder.mid_block")
    for level in reversed(range(4)):
        p = f"decoder.up_blocks.{3 - level}"
        for j in range(3):
            h = resnet(h, f"{p}.resnets.{j}")
        if level > 0:
            h = conv(h.repeat_interleave(2, 2).repeat_interleave(2, 3), f"{p}.upsamplers.0.conv", padding=1)
    out = conv(F.silu(gn(h, "decoder.conv_norm_out")), "decoder.conv_out", padding=1)
    return mean, torch.exp(0.5 * logvar.clamp(-30, 20)), out


def test_vae_matches_an_independent_functional_forward():
    vae = load_vae("random").double()
    with torch.no_grad():
        for p in vae.parameters():  # move GroupNorm affines off 1/0 so that their roles are tested too
            p.add_(0.05 * torch.randn_like(p))
        x = torch.rand(2, 3, 40, 24, dtype=torch.float64) * 2 - 1  # not square: catches a transposed pad
        mean, std = vae.encode(x)
        ref_mean, ref_std, ref_out = functional_vae(vae.state_dict(), x)
        torch.testing.assert_close(mean, ref_mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(std, ref_std, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(vae.decode(mean), ref_out, rtol=1e-10, atol=1e-10)


def write_safetensors(state, path):
    """The documented layout: 8-byte header length, JSON header, raw data."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, tensor in state.items():
        blob = tensor.contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def test_vae_loads_old_attention_names_from_bin_and_safetensors(tmp_path):
    """The hub files predate diffusers 0.17: query/key/value/proj_attn, sometimes as (C, C, 1, 1) convs."""
    state = AutoencoderKL().state_dict()
    old = {}
    for key, value in state.items():
        for new, was in ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."), (".to_out.0.", ".proj_attn.")):
            key = key.replace(new, was)
        old[key] = value[:, :, None, None] if "mid_block.attentions" in key and value.dim() == 2 else value
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in old
    torch.save(old, tmp_path / "diffusion_pytorch_model.bin")
    write_safetensors(old, tmp_path / "diffusion_pytorch_model.safetensors")
    assert load_checkpoint(str(tmp_path / "diffusion_pytorch_model.safetensors")).keys() == old.keys()
    for name in ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors"):
        loaded = load_vae(str(tmp_path / name)).state_dict()
        assert all(torch.equal(loaded[k], state[k]) for k in state)


#################################################################################
#                                    The crop                                   #
#################################################################################

def adm_center_crop_arr(pil_image, image_size):
    """guided-diffusion's center_crop_arr, transcribed from its definition."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


@pytest.mark.parametrize("size", [(256, 256), (500, 375), (375, 500), (1024, 531), (300, 1000), (97, 61), (513, 512)])
def test_center_crop_is_adms(size):
    rng = np.random.default_rng(size)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    crop = center_crop(image, 256)
    assert crop.shape == (256, 256, 3) and crop.dtype == np.uint8
    np.testing.assert_array_equal(crop, adm_center_crop_arr(image, 256))


#################################################################################
#                                 End to end                                    #
#################################################################################

CLASSES = ("n01440764", "n01443537", "n01484850")
BAD = {"n01443537/corrupt.JPEG": "random bytes", "n01484850/truncated.JPEG": "half a JPEG",
       "n01440764/tiny.png": "4x4 pixels"}


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """An ImageFolder of 27 images in 3 classes: varied sizes and aspect ratios, one grayscale, one CMYK and
    one palette image (all usable), and one corrupt, one truncated and one tiny file (skipped)."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        os.makedirs(root / name)
        for i in range(8):
            w, h = (int(s) for s in rng.integers(40, 160, 2))
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name / f"img_{i}.JPEG")
    Image.fromarray(rng.integers(0, 256, (70, 90), dtype=np.uint8), "L").save(root / CLASSES[0] / "gray.JPEG")
    Image.new("CMYK", (80, 64), (10, 200, 30, 5)).save(root / CLASSES[1] / "cmyk.JPEG")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).convert("P").save(root / CLASSES[2] / "pal.png")
    (root / "n01443537" / "corrupt.JPEG").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    data = (root / CLASSES[0] / "img_0.JPEG").read_bytes()
    (root / "n01484850" / "truncated.JPEG").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (4, 4)).save(root / "n01440764" / "tiny.png")
    (root / CLASSES[0] / "notes.txt").write_text("not an image: ignored by extension")
    return root


def prepare(imagenet, out, *extra, torchrun=False, wait=True):
    args = [f"--data-path={imagenet}", f"--out={out}", "--image-size=64", "--vae=random", "--images",
            "--shard-size=4", "--batch-size=3", "--workers=0", *extra]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic in every process, hence the same bytes
    proc = subprocess.Popen([*launcher, "prepare_imagenet.py", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        output = proc.communicate()[0]
        assert proc.returncode == 0, output
        return output
    return proc


def tree(path):
    """{relative path: bytes} of every file under path."""
    return {os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(path) for f in files}


@pytest.fixture(scope="module")
def prepared(imagenet, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "in64"
    prepare(imagenet, out)
    return out


def test_prepared_directory_has_every_readable_image_with_its_label(imagenet, prepared):
    with open(prepared / "manifest.json") as f:
        manifest = json.load(f)
    assert manifest["count"] == 27 and manifest["classes"] == list(CLASSES) and manifest["files"] == 30
    assert sorted(f for f, _ in manifest["skipped"]) == sorted(BAD)
    assert manifest["latent_shape"] == [4, 8, 8] and len(manifest["shards"]) == 8  # 30 files, 4 per shard
    data = Latents(str(prepared), num_eval=3)
    assert len(data.train) + len(data.eval) == 27
    expected = sorted([c for c, name in enumerate(CLASSES) for _ in range(8)] + [0, 1, 2])  # + gray, cmyk, pal
    assert sorted(data.labels.tolist()) == expected and data.labels.tolist() == sorted(data.labels.tolist())
    # Row i holds file i's crop (in sorted order, skipping the bad ones) and the VAE posterior of both flips.
    kept = [f for f, _ in json.load(open(prepared / "plan.json"))["files"] if f not in BAD]
    i = kept.index(f"{CLASSES[1]}/cmyk.JPEG")
    crop = center_crop(Image.open(imagenet / kept[i]).convert("RGB"), 64)
    x, y, images = data.batch([i], flip=torch.tensor([True]), images=True)
    np.testing.assert_array_equal(images[0].numpy(), crop[:, ::-1])
    with torch.no_grad():
        mean, _ = load_vae("random").encode(torch.from_numpy(crop[:, ::-1].copy()).permute(2, 0, 1)[None] / 127.5 - 1)
    torch.testing.assert_close(x, mean * 0.18215, rtol=1e-4, atol=1e-5)
    assert y.tolist() == [1]


def test_train_py_trains_on_the_prepared_directory_and_decodes_its_grids(prepared, tmp_path):
    train_main(train_args([f"--data-path={prepared}", "--image-size=64", "--model=SiT-S/2", "--depth=2",
                           "--hidden-size=32", "--num-heads=2", "--precision=fp32", "--global-batch-size=4",
                           "--max-steps=2", "--eval-every=0", "--sample-every=2", "--sample-steps=1",
                           "--eval-samples=3", f"--results-dir={tmp_path / 'run'}"]))
    assert os.path.exists(tmp_path / "run" / "checkpoints" / "0000002.pt")
    grid = Image.open(tmp_path / "run" / "samples" / "0000002.png")  # through the manifest's VAE
    assert grid.size == (8 * 64, 3 * 64)  # 8 per class, 3 classes, 64px decoded images


def test_a_stopped_and_a_killed_run_resume_to_identical_bytes_and_torchrun_writes_the_same(imagenet, prepared,
                                                                                            tmp_path):
    out = tmp_path / "killed"
    proc = prepare(imagenet, out, wait=False)  # first a SIGTERM (preemption): it stops after the shard under way
    while not os.path.isdir(out / "shard_00000") and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    said = proc.communicate()[0]
    assert proc.returncode == 128 + signal.SIGTERM, said
    assert "SIGTERM: stopped after shard_0000" in said and "every finished shard is kept" in said
    assert not os.path.exists(out / "manifest.json") and not list(out.glob("*.tmp"))
    assert not os.path.exists(out / ".lock")  # released: the next run need not take it over
    proc = prepare(imagenet, out, wait=False)  # then kill -9 after a later shard
    while not os.path.isdir(out / "shard_00003") and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(out / "manifest.json"), "finished before it could be killed: nothing was resumed"
    output = prepare(imagenet, out)
    assert "shards done" in output and "0 of 8 shards done" not in output
    assert tree(out) == tree(prepared)
    prepare(imagenet, tmp_path / "two", torchrun=True)
    assert tree(tmp_path / "two") == tree(prepared)


def test_resuming_with_other_settings_is_refused(imagenet, prepared):
    proc = prepare(imagenet, prepared, "--dtype=float16", wait=False)
    output = proc.communicate()[0]
    assert proc.returncode != 0 and "other settings (dtype: float32 -> float16)" in output


def flip_a_bit(path, offset=-100):
    data = bytearray(open(path, "rb").read())
    data[offset] ^= 0x10
    open(path, "wb").write(bytes(data))


def cut(path, keep=0.5):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: int(len(data) * keep)])


def edit_manifest(out, change):
    with open(out / "manifest.json") as f:
        manifest = json.load(f)
    change(manifest)
    with open(out / "manifest.json", "w") as f:
        json.dump(manifest, f)


@pytest.mark.parametrize("damage, message", [
    (lambda out: cut(out / "shard_00002" / "moments.npy"), "shard_00002/moments.npy has "),
    (lambda out: flip_a_bit(out / "shard_00003" / "moments.npy"), "shard_00003/moments.npy does not match the CRC"),
    (lambda out: flip_a_bit(out / "shard_00000" / "labels.npy", -3), "shard_00000/labels.npy does not match the CRC"),
    (lambda out: flip_a_bit(out / "shard_00007" / "images.npy", 200), "shard_00007/images.npy does not match the CRC"),
    (lambda out: os.remove(out / "shard_00005" / "images.npy"), "shard_00005/images.npy is missing"),
    (lambda out: shutil.rmtree(out / "shard_00001"), "shard_00001/moments.npy is missing"),
    (lambda out: edit_manifest(out, lambda m: m.update(count=m["count"] + 1)), "it does not match its shards"),
    (lambda out: edit_manifest(out, lambda m: m["shards"][4].update(count=3)),
     "shard_00004/moments.npy holds 4 rows, the manifest says 3"),
], ids=["truncated", "bit flip in latents", "bit flip in labels", "bit flip in crops", "file gone", "shard gone",
        "manifest count", "manifest shard count"])
def test_a_damaged_shard_is_named_when_the_directory_is_opened(prepared, tmp_path, damage, message):
    out = tmp_path / "copy"
    shutil.copytree(prepared, out)
    damage(out)
    with pytest.raises(ValueError) as stop:
        Latents(str(out), num_eval=3)
    assert message in str(stop.value) and "prepare_imagenet.py again" in str(stop.value)


def test_train_py_refuses_a_damaged_directory_before_training(prepared, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(prepared, out)
    flip_a_bit(out / "shard_00006" / "moments.npy")
    with pytest.raises(ValueError, match="shard_00006/moments.npy does not match the CRC"):
        train_main(train_args([f"--data-path={out}", "--image-size=64", "--model=SiT-S/2", "--depth=2",
                               "--hidden-size=32", "--num-heads=2", "--precision=fp32", "--global-batch-size=4",
                               "--max-steps=2", "--eval-samples=3", f"--results-dir={tmp_path / 'run'}"]))
    assert not (tmp_path / "run").exists()


def test_the_sizes_only_check_still_stops_a_truncated_shard(prepared, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(prepared, out)
    flip_a_bit(out / "shard_00003" / "moments.npy")
    Latents(str(out), num_eval=3, crc=False)  # train.py --data-check=sizes: a flipped bit is not read for
    cut(out / "shard_00002" / "moments.npy")
    with pytest.raises(ValueError, match="shard_00002/moments.npy has "):
        Latents(str(out), num_eval=3, crc=False)
