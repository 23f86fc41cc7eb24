"""
Sample from a trained SiT (train.py's checkpoints, EMA weights by default) or a released SiT checkpoint; the
model is rebuilt from what the checkpoint holds, so no architecture flag is repeated.

    python sample.py --ckpt results/quickstart/checkpoints/0003000.pt --classes 0 1 2 3 --out grid.png
    torchrun --nproc_per_node=8 sample.py --ckpt CKPT --num-fid-samples 50000 --out samples/xl2.npz  # for fid.py

Samplers integrate SiT's linear interpolant from t = 0 (noise) to t = 1 (data) on a uniform grid:
  heun   the probability-flow ODE, second order: 125 steps = 250 function evaluations (SiT's evaluation)
  euler  the same ODE, first order
  sde    Euler-Maruyama on dx = [v + w(t) s] dt + sqrt(2 w(t)) dW with SiT's "sigma" diffusion w(t) = 1 - t
         and the score s = (t v - x) / (1 - t) taken from the same velocity call (one call per step), ending
         with a noise-free step from t = 0.96 to 1 (SiT's and REPA's "last step" of 0.04)
Classifier-free guidance (--cfg-scale) acts where t lies in --guidance-interval (REPA's guidance-high 0.7 in
its reversed time is --guidance-interval 0.3 1); --legacy-cfg guides only 3 latent channels, as SiT's and
DiT's released samplers did. Latent models are decoded by the SD-VAE (vae.py).

With --num-fid-samples N, sample i's class and noise are functions of (--seed, i) and its batch, so the
result does not depend on the number of GPUs. Each finished batch is saved on its own, so a run started again
with the same command continues where it stopped; the ADM-format .npz (arr_0: N x H x W x 3 uint8) is
assembled from them at the end.
"""
import argparse
import json
import math
import os
import shutil
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from cli import HelpFormatter, Preemption, check_values, setup_distributed
from data import LATENT_SCALE
from checkpoint import load_model, write_atomically
from vae import VAE_URL, load_vae

SAMPLERS = ("heun", "euler", "sde")
LAST_STEP = 0.04  # the SDE's final, noise-free step


#################################################################################
#                                   Samplers                                    #
#################################################################################

def guided_velocity(model, y, cfg_scale=1.0, interval=(0.0, 1.0), legacy_cfg=False):
    """v(x, t) with classifier-free guidance where t lies in interval (one batched call for both halves), the
    plain conditional velocity elsewhere."""
    null = torch.full_like(y, model.config.num_classes)

    def velocity(x, t):
        ts = torch.full((len(x),), t, device=x.device, dtype=x.dtype)
        if cfg_scale == 1.0 or not interval[0] <= t <= interval[1]:
            return model(x, ts, y)
        out = model.forward_with_cfg(torch.cat([x, x]), torch.cat([ts, ts]), torch.cat([y, null]), cfg_scale,
                                     legacy_cfg)
        return out[: len(x)]

    return velocity


@torch.no_grad()
def sample_ode(model, z, y, num_steps=50, cfg_scale=1.0, heun=True, legacy_cfg=False, interval=(0.0, 1.0)):
    """Integrate dx/dt = v(x, t, y) from x = z at t = 0 (noise) to t = 1 (data) in num_steps uniform steps:
    Heun costs two model calls per step (the second at t + dt), Euler one."""
    velocity = guided_velocity(model, y, cfg_scale, interval, legacy_cfg)
    ts = torch.linspace(0, 1, num_steps + 1).tolist()
    x = z
    for t0, t1 in zip(ts[:-1], ts[1:]):
        v0 = velocity(x, t0)
        if heun:
            x = x + (t1 - t0) * (v0 + velocity(x + (t1 - t0) * v0, t1)) / 2
        else:
            x = x + (t1 - t0) * v0
    return x


@torch.no_grad()
def sample_sde(model, z, y, num_steps=250, cfg_scale=1.0, legacy_cfg=False, interval=(0.0, 1.0), generator=None):
    """Euler-Maruyama from t = 0 to 1 - LAST_STEP in num_steps - 1 steps, then one noise-free step to t = 1:
    num_steps model calls. The Brownian increments come from `generator`."""
    velocity = guided_velocity(model, y, cfg_scale, interval, legacy_cfg)

    def drift(x, t):  # v + w(t) s(x, t) with w = 1 - t and s = (t v - x) / (1 - t): the 1 - t cancels
        v = velocity(x, t)
        return v + t * v - x

    ts = torch.linspace(0, 1 - LAST_STEP, num_steps).tolist()
    x = z
    for t0, t1 in zip(ts[:-1], ts[1:]):
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x + drift(x, t0) * (t1 - t0) + math.sqrt(2 * (1 - t0) * (t1 - t0)) * noise
    return x + drift(x, ts[-1]) * LAST_STEP


def generate(model, z, y, args, generator=None):
    """Samples in the model's space for noise z and labels y, with the sampler and guidance of args."""
    guidance = dict(cfg_scale=args.cfg_scale, legacy_cfg=args.legacy_cfg, interval=tuple(args.guidance_interval))
    if args.sampler == "sde":
        return sample_sde(model, z, y, args.num_steps, generator=generator, **guidance)
    return sample_ode(model, z, y, args.num_steps, heun=args.sampler == "heun", **guidance)


#################################################################################
#                                    Images                                     #
#################################################################################

def to_uint8(x):
    """Model-space pixels in [-1, 1], (B, 3, H, W) -> uint8 (B, H, W, 3)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def decode(x, vae=None):
    """uint8 images (B, H, W, 3) of samples: SD-VAE latents through the decoder, pixels directly."""
    return to_uint8(x if vae is None else vae.decode(x / LATENT_SCALE))


def save_grid(images, path, nrow, min_size=64):
    """Write uint8 images (B, H, W, 3) as one PNG, nrow images per row, small ones enlarged (nearest
    neighbour) to at least min_size pixels so that toy samples can be seen."""
    zoom = max(1, -(-min_size // images.shape[1]))
    images = images.repeat(zoom, axis=1).repeat(zoom, axis=2)
    B, H, W, C = images.shape
    rows = -(-B // nrow)
    grid = np.zeros((rows * H, nrow * W, C), dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        grid[r * H:(r + 1) * H, c * W:(c + 1) * W] = img
    Image.fromarray(grid).save(path)


def write_npz(path, parts, count):
    """An ADM-format .npz (arr_0: the first `count` rows of the concatenated .npy files `parts`), streamed
    into the zip one part at a time (50K 256px images are 9.8 GB), written to a temporary file and renamed."""
    first = np.load(parts[0], mmap_mode="r")
    header = {"descr": np.lib.format.dtype_to_descr(first.dtype), "fortran_order": False,
              "shape": (count, *first.shape[1:])}

    def write(tmp):
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf, zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(f, header)
            left = count
            for part in parts:
                rows = np.load(part, mmap_mode="r")[:left]
                f.write(np.ascontiguousarray(rows).tobytes())
                left -= len(rows)
    write_atomically(path, write, count * first[0].nbytes, "every batch is kept. Free some space and run the same "
                     "command to write it")


#################################################################################
#                                  The script                                   #
#################################################################################

def write_part(path, images):
    """One batch of samples as an .npy, written atomically: a batch exists only once complete."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, images)
    write_atomically(path, write, images.nbytes, "every finished batch is kept. Free some space and run the same "
                     "command to continue")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--ckpt", required=True, help="train.py checkpoint or released SiT checkpoint (path or URL)")
    p.add_argument("--no-ema", action="store_true", help="use the trained weights instead of the EMA")
    p.add_argument("--sampler", choices=SAMPLERS, default="heun")
    p.add_argument("--num-steps", type=int, help="steps (default 250 function evaluations: 125 for heun, else 250)")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance scale; 1 = none")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=[0.0, 1.0], metavar=("LOW", "HIGH"),
                   help="guide only while LOW <= t <= HIGH (t = 0 noise, t = 1 data)")
    p.add_argument("--legacy-cfg", action="store_true", help="guide 3 of 4 latent channels (SiT/DiT's numbers)")
    p.add_argument("--vae", default=VAE_URL, help="SD-VAE decoder weights for latent models: URL or path")
    p.add_argument("--out", required=True, help="the PNG grid, or with --num-fid-samples the .npz to write")
    p.add_argument("--classes", type=int, nargs="+", help="grid mode: one row per class (default: 0 to 9)")
    p.add_argument("--per-class", type=int, default=8, help="grid mode: samples per class")
    p.add_argument("--num-fid-samples", type=int, help="write this many samples of uniformly random classes")
    p.add_argument("--batch-size", type=int, default=32, help="samples per model call per process (x2 with CFG)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 autocast of the model")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls and "
                   "convolutions on GPUs that have them, as SiT's sample_ddp.py (its default --tf32); --no-tf32: full "
                   "fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (a warm-up of minutes, then "
                   "faster steps; samples equal to float rounding)")
    args = p.parse_args(argv)
    check_values(p, args, at_least={"num_steps": 1, "per_class": 1, "batch_size": 1, "cfg_scale": 0.0},
                 readable=("ckpt", "vae"), writable=("out",))
    low, high = args.guidance_interval
    if not 0 <= low <= high <= 1:
        p.error(f"--guidance-interval must be LOW HIGH with 0 <= LOW <= HIGH <= 1, got {low} {high}")
    args.num_steps = args.num_steps or (125 if args.sampler == "heun" else 250)
    if args.num_steps < 1 or (args.sampler == "sde" and args.num_steps < 2):
        p.error("--num-steps must be at least 1 (2 for sde)")
    if args.num_fid_samples is not None and (args.num_fid_samples < 1 or not args.out.endswith(".npz")):
        p.error("--num-fid-samples needs a positive count and an --out ending in .npz")
    if args.num_fid_samples is None and not args.out.endswith(".png"):
        p.error("without --num-fid-samples, sample.py draws a grid: give an --out ending in .png")
    if os.path.isdir(args.out):
        p.error(f"--out {args.out} is a directory: give the file to write")
    return args


def batch_inputs(model, first, n, seed, device):
    """Classes and initial noise of samples first .. first + n - 1, each a function of (seed, its index)."""
    cfg = model.config
    ys, zs = [], []
    for i in range(first, first + n):
        rng = np.random.default_rng([seed, i])
        ys.append(rng.integers(cfg.num_classes))
        zs.append(rng.standard_normal((cfg.in_channels, cfg.input_size, cfg.input_size), dtype=np.float32))
    return torch.tensor(ys, device=device), torch.from_numpy(np.stack(zs)).to(device)


SETTINGS_ADDED = {"tf32": False, "compile": False}  # flags added since: what batches made before them used


def check_settings(args, parts_dir, rank, world):
    """Batches of a resumed run must come from the same command: the first run records it, later ones compare."""
    path = os.path.join(parts_dir, "settings.json")
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "classes", "per_class")}
    if rank == 0 and not os.path.exists(path):
        os.makedirs(parts_dir, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(settings, f)
        os.replace(path + ".tmp", path)
    if world > 1:
        dist.barrier()
    with open(path) as f:
        was = {**SETTINGS_ADDED, **json.load(f)}
    if was != settings:
        changed = ", ".join(f"{k}: {was.get(k)} -> {v}" for k, v in settings.items() if was.get(k) != v)
        raise SystemExit(f"{parts_dir} holds batches made with other settings ({changed}): repeat the original "
                         f"command to resume, or choose another --out")


def main(args):
    rank, world, device = setup_distributed()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    model = load_model(args.ckpt, ema=not args.no_ema).to(device).eval()
    if args.compile:
        model.compile()  # every call of the model, guided or not, goes through its compiled __call__
    if args.cfg_scale != 1 and model.config.class_dropout_prob == 0:
        raise SystemExit(f"{args.ckpt} was trained without a null class (--class-dropout=0 or --unconditional), "
                         f"and guidance needs one: use --cfg-scale=1, not {args.cfg_scale}")
    vae = load_vae(args.vae).to(device) if model.config.in_channels == 4 else None
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")

    def images(first, n, y=None):
        labels, z = batch_inputs(model, first, n, args.seed, device)
        g = torch.Generator(device).manual_seed(args.seed * 1_000_003 + first)  # the SDE's noise
        with autocast:
            x = generate(model, z, labels if y is None else y, args, g)
        return decode(x.float(), vae)

    if args.num_fid_samples is None:  # a grid, one row per class, on one process
        classes = args.classes if args.classes is not None else list(range(min(10, model.config.num_classes)))
        wrong = [c for c in classes if not 0 <= c < model.config.num_classes]
        if wrong:
            raise SystemExit(f"--classes {wrong}: {args.ckpt} knows classes 0 to {model.config.num_classes - 1}")
        y = torch.tensor(classes, device=device).repeat_interleave(args.per_class)
        if rank == 0:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            save_grid(images(0, len(y), y), args.out, nrow=args.per_class)
            print(f"{len(y)} samples in {args.out}")
    else:
        if os.path.exists(args.out):
            raise SystemExit(f"{args.out} already exists (a finished run): give another --out, or delete it first")
        parts_dir = args.out[:-4] + ".parts"
        check_settings(args, parts_dir, rank, world)
        B, N = args.batch_size, args.num_fid_samples
        parts = [os.path.join(parts_dir, f"{b:06d}.npy") for b in range(-(-N // B))]
        todo = [b for b in range(rank, len(parts), world) if not os.path.exists(parts[b])]
        with Preemption() as preempt:  # a SIGTERM or SIGUSR1 stops after the batch under way
            for b in tqdm(todo, disable=rank != 0, desc=f"batches of {B} (rank 0 of {world})"):
                first = b * B
                write_part(parts[b], images(first, min(B, N - first)))
                if preempt.requested():
                    done = sum(map(os.path.exists, parts))
                    preempt.stop(f"stopped after a batch; {done} of {len(parts)} batches are in {parts_dir}. Run the "
                                 "same command to make the rest")
        if world > 1:
            dist.barrier()
        if rank == 0:
            write_npz(args.out, parts, N)  # atomic: the batches can go once it exists
            shutil.rmtree(parts_dir)
            print(f"{N} samples in {args.out}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(parse_args())
