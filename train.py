"""
Train SiT with residual routing or Diffusion-Adaptive Routing, on prepared ImageNet latents or the toy shapes.

    python train.py --data=shapes --model=SiT-S/2 --depth=4 --hidden-size=64 --num-heads=4 ...    # CPU, README
    torchrun --nproc_per_node=8 train.py --data-path=data/in256 --routing=dynamic --chunk=4          # one node
    torchrun --nnodes=4 --nproc_per_node=8 --node_rank=$NODE --master_addr=$HOST --master_port=29500 train.py ...
    torchrun --nproc_per_node=8 train.py --data-path=data/in256 --repa --repa-encoder=dinov2_vitb14_pretrain.pth
    torchrun --nproc_per_node=8 train.py --data-path=data/in256 --init-from=SiT-XL-2-256x256.pt --routing=static
    python train.py --bench --model=SiT-XL/2 --routing=dynamic --global-batch-size=32                # speed, memory

The recipe (paper Appendix C.1, which follows SiT): AdamW, lr 1e-4, no weight decay, a constant rate, global
batch 1024, EMA 0.9999, bf16 autocast; x_t = t x1 + (1 - t) eps with t ~ U[0, 1] (t = 0 noise, t = 1 data),
the mean squared error of the predicted velocity x1 - eps, labels dropped to the null class with p = 0.1.

Reproducibility: every random draw of step s (the data order, t, eps, label drops, posterior samples, flips)
is a function of (seed, s) over the whole global batch, and each rank takes its slice. So the same command on
any number of GPUs trains the same model (up to floating-point summation order), and a resumed run repeats
the uninterrupted one exactly.
"""
import argparse
import copy
import importlib
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import repa
from checkpoint import (checkpoints_by_step, init_from, nonfinite_tensors, refuse_used, resolve, resume,
                        save_checkpoint, sha256_of)
from cli import HelpFormatter, Preemption, check_values, close_distributed, setup_distributed
from dar import FINAL_AGGS, KERNELS, ROUTINGS
from data import Latents, OneClass, Prefetcher, Stream, load_data
from diagnose import heat_maps, routing_maps, training_curves
from model import SiT_models, forward_flops, interpolate, model_config
from fid import check_batch, frechet_distance, inception_score, statistics
from inception import INCEPTION_URL, load_inception
from sample import batch_inputs, decode, sample_ode, save_grid
from vae import load_vae

# Dense bf16 tensor-core peaks (FLOP/s) for MFU; more specific names first. Unknown GPUs report no MFU.
PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("H20", 148e12), ("A100", 312e12))


# What --resume may change. Every other flag defines the run (its model, data, held-out split or recipe), and a
# resume that changes one is refused; so a flag you add counts as run-defining until you name it here.
RETUNABLE = ("lr", "grad_clip", "precision", "micro_batch_size", "kernel", "compile", "grad_checkpoint")  # printed
PER_INVOCATION = ("results_dir", "resume", "init_from", "data_check", "max_steps", "log_every", "eval_every",
                  "sample_every", "sample_steps", "sample_cfg", "vae", "ckpt_every", "tensorboard", "bench", "prefetch",
                  "bench_steps", "traffic", "fid_every", "fid_samples", "fid_cfg", "fid_ref", "inception",
                  "repa_encoder")  # repa_encoder: where the weights are on this machine (checkpoints keep their sha256)
# Run-defining flags added since runs were saved, and the value those runs used: they resume with it.
ADDED = {"repa_state": "aggregate", "class_dropout": 0.1, "unconditional": False, "warmup_steps": 0,
         "weight_decay": 0.0, "adam_betas": [0.9, 0.999], "t_sampling": "uniform", "t_lognormal": [0.0, 1.0]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument_group("model")
    a.add_argument("--model", default="SiT-XL/2", choices=list(SiT_models), help="SiT preset (size/patch)")
    a.add_argument("--depth", type=int, help="override the preset's number of blocks (quick experiments)")
    a.add_argument("--hidden-size", type=int, help="override the preset's width")
    a.add_argument("--num-heads", type=int, help="override the preset's attention heads")
    a.add_argument("--routing", default="static", choices=ROUTINGS, help="residual (SiT) or a DAR query variant")
    a.add_argument("--chunk", type=int, default=4, help="DAR chunk size S in sublayers (1 = dense)")
    a.add_argument("--final-agg", choices=FINAL_AGGS, help="DAR final aggregator; default: reuse with --repa, "
                   "else dedicated")
    a.add_argument("--kernel", default="auto", choices=KERNELS, help="DAR aggregation: fused Triton or torch")
    a = p.add_argument_group("data")
    a.add_argument("--data-path", help="a directory written by prepare_imagenet.py")
    a.add_argument("--data", choices=["shapes"], help="the built-in toy dataset instead of --data-path")
    a.add_argument("--data-check", choices=("crc", "sizes"), default="crc", help="on opening --data-path, rank 0 "
                   "checks every shard's CRC (a read of the whole dataset) or only sizes and row counts")
    a.add_argument("--image-size", type=int, help="image size: 256 for ImageNet latents, 32 (default) for shapes")
    a.add_argument("--class-dropout", type=float, help="how often a label is dropped to the null class, which "
                   "classifier-free guidance needs (default 0.1, SiT's); 0: no null class, so no guidance")
    a.add_argument("--unconditional", action="store_true", help="ignore the labels: one class, no null class, "
                   "no guidance (sample grids use guidance 1)")
    a = p.add_argument_group("optimisation")
    a.add_argument("--global-batch-size", type=int, default=1024, help="images per optimiser step, all GPUs")
    a.add_argument("--micro-batch-size", type=int, help="images per GPU per forward; the gradient accumulates "
                   "over global / (GPUs x micro) passes (default: no accumulation)")
    a.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (constant after any warm-up)")
    a.add_argument("--warmup-steps", type=int, default=0, help="raise the rate linearly from lr/N to lr over the "
                   "first N steps (LightningDiT); 0: none (SiT, REPA, the paper)")
    a.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay (SiT: 0)")
    a.add_argument("--adam-betas", type=float, nargs=2, default=[0.9, 0.999], metavar=("B1", "B2"),
                   help="AdamW's betas (SiT and REPA: 0.9 0.999; LightningDiT: 0.9 0.95)")
    a.add_argument("--t-sampling", choices=("uniform", "lognormal"), default="uniform", help="how training draws "
                   "t: uniform on [0, 1] (SiT), or logit-normal, t = sigmoid(m + s n) with n ~ N(0, 1) (LightningDiT's "
                   "'lognorm', SD3), which puts more steps at mid t")
    a.add_argument("--t-lognormal", type=float, nargs=2, default=[0.0, 1.0], metavar=("M", "S"),
                   help="with --t-sampling=lognormal: the m and s of sigmoid(m + s n)")
    a.add_argument("--max-steps", type=int, default=400_000, help="optimiser steps to train for")
    a.add_argument("--grad-clip", type=float, help="clip the gradient norm to this; 0: off. Default 0 (SiT), 1.0 "
                   "with --repa (REPA's max_grad_norm)")
    a.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay per step")
    a.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="bf16 autocast or plain fp32")
    a.add_argument("--compile", action="store_true", help="torch.compile the model")
    a.add_argument("--grad-checkpoint", action="store_true", help="recompute activations in the backward")
    a.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and every draw")
    a.add_argument("--prefetch", type=int, help="steps whose batches a background thread reads ahead (the same "
                   "numbers as reading them in the step; 0: read in the step). Default 2 with a GPU; 0 without, where "
                   "the thread takes CPU time from the model (the toy quick start ran 1.2-1.4x slower with it)")
    a = p.add_argument_group("REPA")
    a.add_argument("--repa", action="store_true", help="add REPA's alignment loss (DINOv2-B features)")
    a.add_argument("--repa-encoder", default=repa.DINOV2_URL, help="dinov2_vitb14_pretrain.pth: path or URL")
    a.add_argument("--repa-depth", type=int, help="align z_k after block k (default 8; 4 for S and B models)")
    a.add_argument("--repa-state", choices=("aggregate", "summary"), default="aggregate", help="under DAR, what "
                   "REPA aligns after block k: the aggregate block k+1's attention reads (h_2k+1, as the paper's "
                   "z_k), or block k's MLP output v_2k, the chunk summary every later aggregator reads")
    a.add_argument("--repa-coeff", type=float, default=0.5, help="weight of the alignment loss")
    a = p.add_argument_group("run")
    a.add_argument("--results-dir", help="this run's directory (default: results/<model>-<routing>)")
    a.add_argument("--resume", help="continue a run from a checkpoint path, or 'latest' in --results-dir")
    a.add_argument("--init-from", help="start from a checkpoint's weights (ours or a released SiT), path or URL")
    a.add_argument("--log-every", type=int, default=100, help="steps between log lines")
    a.add_argument("--eval-every", type=int, default=10_000, help="steps between held-out losses (0: never)")
    a.add_argument("--eval-samples", type=int, default=1_000, help="held-out images evaluated")
    a.add_argument("--sample-every", type=int, default=10_000, help="steps between EMA sample grids (0: never)")
    a.add_argument("--sample-steps", type=int, default=50, help="Heun steps of the grid's ODE sampler")
    a.add_argument("--sample-cfg", type=float, default=4.0, help="guidance scale of the sample grids")
    a.add_argument("--vae", help="SD-VAE that decodes the grids of latent models (default: the dataset's)")
    a.add_argument("--fid-every", type=int, default=0, help="steps between FID and IS of EMA samples, logged to "
                   "log.jsonl (0: never); the ranks share the sampling")
    a.add_argument("--fid-samples", type=int, default=10_000, help="EMA samples of each FID (sample.py's classes "
                   "and noise for samples 0..K-1; Heun with --sample-steps)")
    a.add_argument("--fid-cfg", type=float, default=1.0, help="guidance scale of the FID samples")
    a.add_argument("--fid-ref", help="reference statistics (an .npz with mu and sigma: ADM's reference batch, or "
                   "one fid.py --make-ref wrote from an image folder, an .npz or the toy data)")
    a.add_argument("--inception", default=INCEPTION_URL, help="the FID Inception's weights: URL or path")
    a.add_argument("--ckpt-every", type=int, default=50_000, help="steps between checkpoints")
    a.add_argument("--tensorboard", action="store_true", help="also log every number to TensorBoard, under "
                   "<results-dir>/tensorboard (needs the tensorboard package; log.jsonl and curves.png are always "
                   "written)")
    a.add_argument("--bench", action="store_true", help="time training steps and exit; without --data-path "
                   "or --data, on random latents of ImageNet's shape")
    a.add_argument("--bench-steps", type=int, default=20, help="with --bench: steps timed (after up to 5 "
                   "warm-up steps)")
    a.add_argument("--traffic", action="store_true", help="with --bench: count the bytes and kernels of one step "
                   "for every routing on fake tensors (no GPU, no data; tools/traffic.py) instead of timing")
    args = p.parse_args(argv)

    if args.data and args.data_path or not (args.data or args.data_path or args.bench):
        p.error("give exactly one of --data-path DIR (prepared latents) and --data=shapes (the toy data)")
    if args.resume and args.init_from:
        p.error("--resume continues a run, --init-from starts a new one from weights: give one")
    if args.data_path in ("shapes", "random"):
        p.error(f"--data-path={args.data_path} would name a built-in data set, not a directory: use "
                f"--data={args.data_path} for it, or ./{args.data_path} for a directory of that name")
    if args.class_dropout is None:
        args.class_dropout = 0.0 if args.unconditional else 0.1
    elif args.unconditional and args.class_dropout > 0:
        p.error(f"--unconditional has no null class to drop labels to: leave out --class-dropout={args.class_dropout}")
    if args.final_agg is None:
        args.final_agg = "reuse" if args.repa else "dedicated"
    if args.grad_clip is None:
        args.grad_clip = 1.0 if args.repa else 0.0
    if args.repa_depth is None:
        args.repa_depth = 4 if args.model.split("/")[0] in ("SiT-S", "SiT-B") else 8
    if args.repa and args.repa_state == "summary" and (args.routing == "residual" or 2 * args.repa_depth % args.chunk):
        p.error(f"--repa-state=summary aligns v_2k, block k's MLP output, which is a chunk summary only under DAR "
                f"with a --chunk that divides 2 x --repa-depth = {2 * args.repa_depth}: use --repa-state=aggregate, "
                "or such a --chunk")
    if args.tensorboard:
        try:
            importlib.import_module("torch.utils.tensorboard")
        except ImportError:
            p.error("--tensorboard needs the tensorboard package, which is optional: pip install tensorboard, or "
                    "leave the flag out (log.jsonl and curves.png in the run directory hold the same numbers)")
    if args.prefetch is None:
        args.prefetch = 2 if torch.cuda.is_available() else 0
    if args.fid_every and not args.fid_ref:
        p.error("--fid-every needs --fid-ref, the reference statistics: make them once with python fid.py --make-ref "
                "IMAGE_FOLDER (or shapes, or an .npz) --image-size=N ref.npz")
    if args.results_dir is None:
        args.results_dir = os.path.join("results", f"{args.model.replace('/', '-')}-{args.routing}")
    if not (0 <= args.adam_betas[0] < 1 and 0 <= args.adam_betas[1] < 1):
        p.error(f"--adam-betas {args.adam_betas[0]} {args.adam_betas[1]}: each must lie in [0, 1), e.g. 0.9 0.999")
    if args.t_lognormal[1] <= 0:
        p.error(f"--t-lognormal's S is {args.t_lognormal[1]}: it is a standard deviation, give one above 0")
    ones = ("chunk", "global_batch_size", "micro_batch_size", "log_every", "ckpt_every", "max_steps", "eval_samples",
            "sample_steps", "bench_steps", "depth", "hidden_size", "num_heads", "image_size", "repa_depth")
    check_values(p, args, at_least={**dict.fromkeys(ones, 1), "eval_every": 0, "sample_every": 0, "grad_clip": 0.0,
                                    "warmup_steps": 0, "weight_decay": 0.0, "fid_every": 0, "fid_samples": 1,
                                    "fid_cfg": 0.0, "prefetch": 0, "repa_coeff": 0.0, "sample_cfg": 0.0},
                 positive=("lr",),
                 within={"ema_decay": (0.0, 1.0), "class_dropout": (0.0, 1.0)},
                 readable=("init_from", "repa_encoder", "vae", "fid_ref", "inception"),
                 writable=("results_dir",))
    return args


#################################################################################
#                                   Helpers                                     #
#################################################################################

def build_model(args, data):
    overrides = {k: v for k, v in (("depth", args.depth), ("hidden_size", args.hidden_size),
                                   ("num_heads", args.num_heads)) if v is not None}
    return SiT_models[args.model](
        input_size=data.size, in_channels=data.channels, num_classes=data.num_classes,
        class_dropout_prob=args.class_dropout, routing=args.routing, chunk=args.chunk, final_agg=args.final_agg,
        kernel=args.kernel, **overrides)


class Trainee(nn.Module):
    """What DDP wraps: the SiT and, with REPA, its projector. forward returns the velocity and the projected
    z_k (or None)."""

    def __init__(self, model, projector=None, repa_depth=None, repa_state="aggregate"):
        super().__init__()
        self.model, self.projector, self.repa_depth, self.repa_state = model, projector, repa_depth, repa_state

    def forward(self, x, t, y):
        if self.projector is None:
            return self.model(x, t, y), None
        k = self.repa_depth
        if self.repa_state == "summary":  # v_2k: block k's MLP output, the chunk summary later aggregators read
            v, extras = self.model(x, t, y, outputs_at=(2 * k,))
            return v, self.projector(extras["v"][2 * k])
        v, extras = self.model(x, t, y, return_states=True, states_at=(k,))  # z_k = h_2k+1, the only one kept
        return v, self.projector(extras["z"][k - 1])


def peak_flops(device, precision):
    if device.type != "cuda" or precision != "bf16":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS if key in name), None)


#################################################################################
#                                    Training                                   #
#################################################################################

def main(args):
    # 1. Processes, devices, precision.
    rank, world, device = setup_distributed()
    master = rank == 0
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False  # bit-exact resume (PatchEmbed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    if args.global_batch_size % world:
        raise SystemExit(f"--global-batch-size {args.global_batch_size} must be divisible by the {world} processes")
    per_rank = args.global_batch_size // world
    micro = args.micro_batch_size or per_rank
    if per_rank % micro:
        raise SystemExit(f"--micro-batch-size {micro} must divide the per-process batch {per_rank}")
    accum = per_rank // micro

    # 2. Data, model, EMA, REPA, optimiser.
    # Rank 0 reads every shard once to check its CRCs (the others check sizes): damage stops the job before step 1.
    crc = master and args.data_check == "crc"
    data = load_data(args.data or args.data_path or "random", args.image_size, args.seed, args.eval_samples, crc)
    vae = None  # decodes the sample grids (rank 0) and FID samples (every rank) of latent models
    if isinstance(data, Latents) and not args.bench and (master and args.sample_every or args.fid_every):
        vae = load_vae(args.vae or data.manifest["vae"]).to(device)
    fid_ref = fid_reference(args.fid_ref, data) if args.fid_every else None
    inception = load_inception(args.inception).to(device) if args.fid_every else None
    if args.unconditional:
        data = OneClass(data)
    model = build_model(args, data).to(device)
    model.grad_checkpoint = args.grad_checkpoint
    projector, encoder = None, None
    if args.repa:
        pixels = image_pixels(data)
        grid, tokens = repa.input_size(pixels) // 14, (data.size // model.config.patch_size) ** 2
        if tokens != grid ** 2:
            fix = (f"use a SiT-*/{data.size // grid} model on these {data.size} x {data.size} inputs" if data.size
                   % grid == 0 else f"give inputs of {grid} x the patch size on a side")
            raise SystemExit(f"REPA aligns with DINOv2's {grid} x {grid} patch tokens of {pixels}px images, but this "
                             f"model has {tokens} tokens: {fix}")
        if not 1 <= args.repa_depth <= model.config.depth:
            raise SystemExit(f"--repa-depth must be in [1, {model.config.depth}]")

        projector = repa.projector(model.config.hidden_size).to(device)
        encoder = repa.load_encoder(args.repa_encoder, tokens=grid ** 2).to(device)
    trainee = Trainee(model, projector, args.repa_depth, args.repa_state)
    # The sha256 of every weight file this run started from, kept in its checkpoints.
    weight_files = {flag: dict(source=source, sha256=sha256_of(resolve(source)))
                    for flag, source in (("init_from", args.init_from), ("repa_encoder", args.repa and args.repa_encoder))
                    if source and source != "random"}
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(trainee.parameters(), lr=args.lr, betas=tuple(args.adam_betas),
                            weight_decay=args.weight_decay)
    step = 0

    ckpt_dir = os.path.join(args.results_dir, "checkpoints")
    if args.resume:
        step = resume(args, ckpt_dir, model, ema, opt, projector, RETUNABLE, PER_INVOCATION, master, ADDED)
    elif not args.bench:
        refuse_used(args.results_dir)
        if args.init_from:
            init_from(model, args.init_from)
            ema.load_state_dict(model.state_dict())
    module = torch.compile(trainee) if args.compile else trainee
    if world > 1:
        module = DDP(module, device_ids=[device.index] if device.type == "cuda" else None)

    if args.bench:
        return bench(args, module, opt, model, ema, encoder, data, device, autocast, world, micro, accum)
    if master:
        os.makedirs(ckpt_dir, exist_ok=True)
        os.makedirs(os.path.join(args.results_dir, "samples"), exist_ok=True)
        if not args.resume:  # a resumed run keeps the first start's args.json; the log records each resume
            with open(os.path.join(args.results_dir, "args.json"), "w") as f:
                json.dump(vars(args), f, indent=1)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{args.model} {args.routing} c{args.chunk}: {n_params / 1e6:.2f}M parameters; {world} process(es), "
              f"{per_rank} images each per step in {accum} pass(es); {device}, {args.precision}")
    stream = Stream(data, args.global_batch_size, args.seed, device,
                    args.t_lognormal if args.t_sampling == "lognormal" else None)
    log = RunLog(args.results_dir, args.tensorboard) if master else None
    if log and args.resume:
        log.write(dict(step=step, resumed=vars(args)), quiet=True)
    fpi, peak = forward_flops(model_config(model)), peak_flops(device, args.precision)
    loss_sum, interval_steps, t_last = torch.zeros(2, device=device), 0, time.time()
    finite_grads = torch.ones((), dtype=torch.bool, device=device)  # every step's gradient so far, checked without a sync

    def save(step):
        """The checkpoint of this step, written by rank 0 once every rank has checked the state is finite."""
        stop_unless_finite(all_reduced(loss_sum, world)[0].item(), finite_grads.item(), step, ckpt_dir)
        bad = nonfinite_tensors(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict())
        if bad:  # the last line of defence: nothing non-finite is ever written
            stop_unless_finite(float("nan"), False, step, ckpt_dir, f"non-finite values in {bad}")
        path = os.path.join(ckpt_dir, f"{step:07d}.pt")
        if master:
            save_checkpoint(dict(config=model_config(model), args=vars(args), step=step, model=model.state_dict(),
                                 ema=ema.state_dict(), opt=opt.state_dict(),
                                 projector=projector.state_dict() if projector is not None else None,
                                 rng=dict(cpu=torch.get_rng_state()), weights=weight_files,
                                 data=dict(seed=args.seed, samples_seen=step * args.global_batch_size)), path)
        if world > 1:
            dist.barrier()
        return path

    # 3. The loop. A SIGTERM or SIGUSR1 (a scheduler's warning) checkpoints at the end of the step and stops.
    first_step = step
    mine = slice(rank * per_rank, (rank + 1) * per_rank)  # this rank's share of the global batch
    batches = Prefetcher(lambda s: load_step(data, stream, s, model.config.class_dropout_prob, mine, micro, accum,
                                             encoder is not None), step, args.max_steps, args.prefetch)
    with Preemption() as preempt, batches:
        while step < args.max_steps:
            draw, parts = batches.get(step)
            if args.warmup_steps:  # set every step: a resume continues the ramp where it was
                for group in opt.param_groups:
                    group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup_steps)
            losses, grad_norm = train_step(args, module, opt, draw, parts, mine, micro, accum, encoder, autocast,
                                           model.config.num_classes)
            update_ema(ema, model, args.ema_decay)
            finite_grads &= torch.isfinite(grad_norm)
            step += 1
            if master and step == first_step + 1 and args.log_every > 1:  # a sign of life before the first log line
                print(f"step {step} took {time.time() - t_last:.1f} s; the next log line is at step "
                      f"{(step // args.log_every + 1) * args.log_every} (slow? see OMP_NUM_THREADS in the README)",
                      flush=True)
            loss_sum += torch.stack([losses[0], losses[1]]).detach()
            interval_steps += 1

            if step % args.log_every == 0 or step == args.max_steps:
                loss, repa_loss = (all_reduced(loss_sum, world) / (interval_steps * world)).tolist()
                stop_unless_finite(loss, finite_grads.item(), step, ckpt_dir)
                dt = time.time() - t_last
                record = dict(step=step, loss=loss, grad_norm=grad_norm.item(), steps_per_s=interval_steps / dt,
                              images_per_s=interval_steps * args.global_batch_size / dt)
                if args.repa:
                    record["repa_loss"] = repa_loss
                if device.type == "cuda":
                    record["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                    if peak:
                        record["mfu"] = 3 * fpi * record["images_per_s"] / (world * peak)
                write_log(log, record)
                loss_sum.zero_()
                interval_steps, t_last = 0, time.time()
            if args.eval_every and (step % args.eval_every == 0 or step == args.max_steps):
                write_log(log, dict(step=step, **evaluate(args, model, ema, data, device, autocast, rank, world)))
            if master and args.sample_every and (step % args.sample_every == 0 or step == args.max_steps):
                sample_grid(args, ema, data, device, step, vae)
            if args.fid_every and (step % args.fid_every == 0 or step == args.max_steps):
                write_log(log, dict(step=step, **fid_of_ema(args, ema, device, vae, inception, fid_ref, rank, world)))
            saved = step % args.ckpt_every == 0 or step == args.max_steps
            if saved:
                path = save(step)
            if preempt.requested(world, device):
                path = path if saved else save(step)
                if log:
                    write_log(log, dict(step=step, preempted=preempt.signal.name if preempt.signal else "another rank"))
                preempt.stop(f"stopped at step {step} with its checkpoint {path}; continue the run with the same "
                             "command and --resume=latest")


def load_step(data, stream, step, drop_prob, mine, micro, accum, images):
    """(the draw of `step`, [(x1, y, images) of each accumulation pass over this rank's share]): everything a
    step reads from the data, a function of (seed, step), made by the Prefetcher ahead of the step."""
    draw = stream.draw(step, drop_prob)
    parts = []
    for k in range(accum):
        part = slice(mine.start + k * micro, mine.start + (k + 1) * micro)
        x1, y, pixels = data.batch(draw["indices"][part], draw["flip"][part], draw["posterior"][part], images=images)
        parts.append((x1.to(draw["t"].device, non_blocking=True), y.to(draw["t"].device, non_blocking=True), pixels))
    return draw, parts


def train_step(args, module, opt, draw, parts, mine, micro, accum, encoder, autocast, null_class):
    """One optimiser step over this rank's share of the global batch, whose passes' data are `parts`
    (load_step); returns ((loss, repa loss), grad norm)."""
    total, total_repa = 0.0, 0.0
    for k, (x1, y, images) in enumerate(parts):
        part = slice(mine.start + k * micro, mine.start + (k + 1) * micro)
        y = torch.where(draw["drop"][part], null_class, y)  # for classifier-free guidance
        xt, target = interpolate(x1, draw["eps"][part], draw["t"][part])
        if isinstance(module, DDP):
            module.require_backward_grad_sync = k == accum - 1  # all-reduce gradients on the last pass only
        with autocast:
            v, projected = module(xt, draw["t"][part], y)
            loss = (v.float() - target).pow(2).mean()
            repa_loss = torch.zeros((), device=loss.device)
            if projected is not None:
                with torch.no_grad():
                    features = encoder(repa.preprocess(images))
                repa_loss = repa.alignment_loss(projected, features)
        ((loss + args.repa_coeff * repa_loss) / accum).backward()
        total, total_repa = total + loss.detach() / accum, total_repa + repa_loss.detach() / accum
    params = [p for group in opt.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return (total, total_repa), grad_norm


def all_reduced(x, world):
    """The sum of x over all processes, as a new tensor."""
    x = x.clone()
    if world > 1:
        dist.all_reduce(x)
    return x


def stop_unless_finite(loss, grads_finite, step, ckpt_dir, what=None):
    """Stop the run, before anything else is written, if the loss or any step's gradient is not finite: a NaN
    gradient makes NaN weights even when the loss that produced it was finite."""
    if math.isfinite(loss) and grads_finite:
        return
    what = what or (f"the loss is {loss}" if not math.isfinite(loss) else "a gradient is not finite")
    last = checkpoints_by_step(ckpt_dir)
    where = (f"The last good checkpoint is {last[0][1]} (every checkpoint written is finite): resume from it with "
             f"--resume={last[0][1]} and a lower --lr or a --grad-clip (both may change on resume), or with "
             "--precision=fp32" if last else "No checkpoint was written yet: start again with a lower --lr or a "
             f"--grad-clip, in a new --results-dir (or after deleting {os.path.dirname(ckpt_dir)})")
    raise SystemExit(f"step {step}: {what}; stopping before anything else is written. {where}.")


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, every parameter and buffer (pos_embed too, as SiT), in one
    foreach call (a few kernels, not one per tensor; the same arithmetic as a lerp_ each)."""
    torch._foreach_lerp_(list(ema.state_dict().values()), list(model.state_dict().values()), 1 - decay)


def image_pixels(data):
    """The side of the images behind the model's inputs: latents are the images at 1/8, the toy data is pixels."""
    return data.size * (8 if data.channels == 4 else 1)


def fid_reference(path, data):
    """(mu, sigma) of the reference statistics in `path`, checked against the images this run's samples will be."""
    pixels = image_pixels(data)
    with np.load(path) as ref:
        if "mu" not in ref.files or "sigma" not in ref.files:
            raise SystemExit(f"--fid-ref {path} has no statistics (mu, sigma): add them once with python fid.py "
                             f"--make-ref {path} ref_stats.npz, and give that file")
        mu, sigma = ref["mu"], ref["sigma"]
    size = check_batch(path, "reference")
    if tuple(size) != (pixels, pixels):
        raise SystemExit(f"--fid-ref {path} holds {size[0]}x{size[1]} images and this run's samples are {pixels}x"
                         f"{pixels}: FID across resolutions mostly measures the resolution. Make a reference of "
                         f"{pixels}px images (fid.py --make-ref ... --image-size={pixels})")
    return mu, sigma


FID_BATCH = 50  # samples per model call while measuring FID


@torch.no_grad()
def fid_of_ema(args, ema, device, vae, inception, reference, rank, world):
    """FID and IS of --fid-samples EMA samples: sample.py's classes and noise for samples 0..K-1 (functions of
    (seed, i)), Heun with --sample-steps, guidance --fid-cfg; rank r makes the r-th contiguous block, and every
    rank gathers the Inception features of all, so the result does not depend on the number of processes."""
    K = args.fid_samples
    per = -(-K // world)
    first, mine = rank * per, max(0, min(per, K - rank * per))
    cfg = args.fid_cfg if ema.config.class_dropout_prob > 0 else 1.0  # no null class: no guidance
    pool = torch.zeros(per, 2048, dtype=torch.float64, device=device)
    logits = torch.zeros(per, 1008, dtype=torch.float64, device=device)
    for start in range(0, mine, FID_BATCH):
        n = min(FID_BATCH, mine - start)
        y, z = batch_inputs(ema, first + start, n, args.seed, device)
        images = decode(sample_ode(ema, z, y, num_steps=args.sample_steps, cfg_scale=cfg).float(), vae)
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # as fid.py: TF32 moves FID
        out = inception(torch.from_numpy(images).to(device))
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        pool[start:start + n], logits[start:start + n] = out["pool"].double(), out["logits"].double()
    if world > 1:
        gathered = []
        for mine_only in (pool, logits):
            parts = [torch.zeros_like(mine_only) for _ in range(world)]
            dist.all_gather(parts, mine_only)
            gathered.append(torch.cat(parts))
        pool, logits = gathered
    pool, logits = pool[:K].cpu().numpy(), logits[:K].cpu().numpy()
    return dict(fid=float(frechet_distance(*statistics(pool), *reference)),
                inception_score=float(inception_score(logits)), fid_samples=K)


@torch.no_grad()
def evaluate(args, model, ema, data, device, autocast, rank, world):
    """Held-out velocity loss of the model and of its EMA at a fixed grid of t, with fixed noise and (for
    latents) the posterior mean: the same numbers for the same weights, comparable between runs."""
    ts = (torch.arange(8, device=device) + 0.5) / 8
    indices = torch.as_tensor(list(data.eval))[: args.eval_samples]
    g = torch.Generator(device).manual_seed(12345)
    eps = torch.randn(len(indices), data.channels, data.size, data.size, generator=g, device=device)
    sums = torch.zeros(2, len(ts), device=device)
    mine = range(rank, len(indices), world)
    for start in range(0, len(mine), 64):
        part = torch.as_tensor(mine[start:start + 64])
        x1, y, _ = data.batch(indices[part], flip=None, noise=None)
        x1, y = x1.to(device), y.to(device)
        for j, t in enumerate(ts):
            tt = t.expand(len(part))
            xt, target = interpolate(x1, eps[part.to(device)], tt)
            for m, net in enumerate((model, ema)):
                with autocast:
                    sums[m, j] += (net(xt, tt, y).float() - target).pow(2).mean((1, 2, 3)).sum()
    per_t = (all_reduced(sums, world) / len(indices)).tolist()
    return dict(eval_loss=sum(per_t[0]) / len(ts), eval_loss_ema=sum(per_t[1]) / len(ts), eval_t=ts.tolist(),
                eval_loss_by_t=per_t[0], eval_loss_ema_by_t=per_t[1])


@torch.no_grad()
def sample_grid(args, ema, data, device, step, vae):
    """A PNG of EMA samples, one row per class (up to 10 classes), from fixed noise; latents decoded by vae."""
    classes = min(10, data.num_classes)
    g = torch.Generator(device).manual_seed(777)
    y = torch.arange(classes, device=device).repeat_interleave(8)
    z = torch.randn(len(y), data.channels, data.size, data.size, generator=g, device=device)
    guided = args.sample_cfg if ema.config.class_dropout_prob > 0 else 1.0  # no null class: no guidance
    x = sample_ode(ema, z, y, num_steps=args.sample_steps, cfg_scale=guided)
    path = os.path.join(args.results_dir, "samples", f"{step:07d}.png")
    save_grid(decode(x, vae), path, nrow=8)
    print(f"step {step}: samples in {path}")
    if ema.config.routing != "residual":  # and how the EMA model routes, to watch routing form as it trains
        held_out = list(data.eval)[:16]
        maps = path[:-4] + "_routing.png"
        heat_maps(routing_maps(ema, data, held_out, device=device),
                  f"step {step}: mean routing weights of the EMA (aggregator L + 1 is the final one)", maps,
                  xlabel="aggregator l", xtick="{}")


def bench(args, module, opt, model, ema, encoder, data, device, autocast, world, micro, accum):
    """--bench: time full training steps (forward, backward, optimiser, EMA) on the device, on data
    drawn as training draws it, read ahead as --prefetch says; print step time, images/s, peak memory and MFU as
    one table row. On prepared latents (--data-path) a line before it compares the reading: batches/s of the
    loader alone, and the step time with the batches read in the step (--prefetch=0)."""
    steps = args.bench_steps
    warmup = min(5, steps)
    stream = Stream(data, args.global_batch_size, args.seed, device)
    per_rank = args.global_batch_size // world
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    make = lambda s: load_step(data, stream, s, model.config.class_dropout_prob, slice(0, per_rank), micro, accum,
                               encoder is not None)

    def timed(depth):
        with Prefetcher(make, 0, warmup + steps, depth) as batches:
            for step in range(warmup + steps):
                if step == warmup:
                    sync()
                    start = time.time()
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                draw, parts = batches.get(step)
                train_step(args, module, opt, draw, parts, slice(0, per_rank), micro, accum, encoder, autocast,
                           model.config.num_classes)
                update_ema(ema, model, args.ema_decay)
            sync()
        return (time.time() - start) / steps

    if isinstance(data, Latents):
        start = time.time()
        for step in range(steps):
            make(step)
        sync()
        alone = steps / (time.time() - start)
        print(f"loader: {alone:.1f} batches/s alone; step {timed(0):.3f} s reading in the step (--prefetch=0), "
              f"the row below with --prefetch={args.prefetch}")
    step_time = timed(args.prefetch)
    images_per_s = args.global_batch_size / step_time
    peak = peak_flops(device, args.precision)
    mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GB" if device.type == "cuda" else "n/a"
    mfu = f"{3 * forward_flops(model_config(model)) * images_per_s / (world * peak):.1%}" if peak else "n/a"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"| device | model | routing | kernel | batch/GPU | step s | images/s | peak memory | MFU |\n"
          f"| {name} | {args.model} | {args.routing} c{args.chunk} | {args.kernel} | {micro} x {accum} | "
          f"{step_time:.3f} | {images_per_s:.1f} | {mem} | {mfu} |")


class RunLog:
    """Rank 0's record of a run: log.jsonl (a JSON object a line, appended and flushed), the same line printed,
    curves.png redrawn from the whole log at every line with a loss (diagnose.training_curves) and, with
    --tensorboard, every number as a TensorBoard scalar under tensorboard/."""

    def __init__(self, results_dir, tensorboard=False):
        self.path, self.curves = os.path.join(results_dir, "log.jsonl"), os.path.join(results_dir, "curves.png")
        self.file, self.board = open(self.path, "a"), None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # parse_args checked that it imports

            self.board = SummaryWriter(os.path.join(results_dir, "tensorboard"))

    def write(self, record, quiet=False):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if quiet:
            return
        print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
                       if not isinstance(v, (list, dict))))
        if self.board is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.board.add_scalar(key, value, record["step"])
            self.board.flush()
        if any(k in record for k in ("loss", "eval_loss", "fid")):
            training_curves(self.path, self.curves)


def write_log(log, record):
    if log is not None:
        log.write(record)


if __name__ == "__main__":
    args = parse_args()
    if args.traffic:  # the byte counter (tools/traffic.py) imports this file, so it runs as a process of its own
        here = os.path.dirname(os.path.abspath(__file__))
        sys.exit(subprocess.call([sys.executable, os.path.join(here, "tools", "traffic.py"), *sys.argv[1:]]))
    try:
        main(args)
    except SystemExit:  # a stop every rank makes at the same point (preemption, a non-finite loss, a refusal)
        close_distributed()
        raise
    close_distributed()
