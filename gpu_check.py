"""
Every figure that only a GPU can give, in one command, for a session that is lent one:

    python gpu_check.py            on one CUDA GPU: at most 9.3 minutes, compiles included; no network, no data
    python gpu_check.py --smoke    the same code at tiny sizes on a CPU (Triton's interpreter), in about a minute
    python gpu_check.py --part=kernel    one part alone, printed (any part named below)

Its own file because it drives the others (kernel.py, train.py, sample.py, vae.py, test_parity.py) as a user
would, each part in a subprocess with its own time limit, so a slow or failing part is reported and the others
still run. It writes one Markdown report (device, driver, versions, date, then each part's output) under
docs/gpu/ (--smoke: under results/), and prints it. The parts:
  1. parity      the kernel against fp64 at full size (B = 4, T = 256): the 24 cases of N in {18, 57} at
                 d = 1152, every config at N = 57, and the whole model on the kernel vs the reference path
  2. kernel      naive vs fused aggregation at N in {5, 9, 18, 57}: times, fraction of copy bandwidth, memory
  3. configs     every config of each fused kernel timed alone at N = 57 (to choose kernel.PINNED by)
  4. step        `train.py --bench` at SiT-XL/2, batch 32: residual, static c4, dynamic c4, static dense, with
                 step time, images/s, peak memory, MFU and the ratio to residual
  5. throughput  SD-VAE encoding images/s (random weights, bf16, 256 px, as prepare_imagenet.py runs it) and
                 sample.py's images/s at SiT-XL/2 (Heun, 125 steps = 250 evaluations, guidance 1.5)
  6. exact       two identical 6-step training runs and one stopped at step 3 and resumed give identical losses
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

from cli import HelpFormatter

HERE = os.path.dirname(os.path.abspath(__file__))


def python(*args):
    return [sys.executable, *args]


def parts(smoke):
    """(name, time limit in s, command) of every part; --smoke shrinks each to seconds on a CPU."""
    xl = ["--model=SiT-S/2", "--depth=2", "--hidden-size=32", "--num-heads=2", "--image-size=64",
          "--global-batch-size=2", "--bench-steps=1"] if smoke else ["--model=SiT-XL/2", "--global-batch-size=32"]
    bench = [(routing, chunk) for routing, chunk in (("residual", 4), ("static", 4), ("dynamic", 4), ("static", 1))]
    parity = "N2-d72-static-noLN-float32" if smoke else "N57-d1152 or N18-d1152 or every_autotune or model_on"
    flag = ["--smoke"] if smoke else []
    return [  # the limits add up to 555 s
        ("parity", 60 if smoke else 140, python("-m", "pytest", "-q", "-x", "test_parity.py", "-k", parity)),
        ("kernel", 60 if smoke else 75, python(__file__, "--part=kernel", *flag)),
        ("configs", 60, python(__file__, "--part=configs", *flag)),
        ("step", 60 if smoke else 140, python(__file__, "--part=step", *flag)),
        ("throughput", 60, python(__file__, "--part=throughput", *flag)),
        ("exact", 60 if smoke else 80, python(__file__, "--part=exact", *flag)),
    ], xl, bench


def timer(device):
    """A function timing a function in ms: the median of triton.testing.do_bench on a GPU, of 3 wall-clock runs on
    a CPU (under TRITON_INTERPRET=1, only to exercise the code)."""
    if device.type == "cuda":
        from triton import testing

        return lambda fn: testing.do_bench(fn, return_mode="median")  # its default summary is the mean

    def do_bench(fn, reps=3):
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[reps // 2]
    return do_bench


def measure_copy(nbytes, device, do_bench):
    """GB/s of a device-to-device copy of `nbytes`."""
    import torch

    big = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return 2 * big.numel() / do_bench(lambda: big.clone()) / 1e6


def configs_part(smoke):
    """Every config each kernel may run (kernel.CONFIGS), timed alone at the working point (per-token query,
    LayerNorm fused, h saved), in ms and in GB/s of the bytes it moves (kernel.traffic), also as a fraction of a
    device-to-device copy, the pinned one marked: the figures kernel.PINNED should be chosen by."""
    import torch

    import kernel

    batch, T, d, N, dtype = (2, 4, 16, 3, torch.float32) if smoke else (32, 256, 1152, 57, torch.bfloat16)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    do_bench = timer(device)
    randn = lambda *shape: torch.randn(*shape, dtype=dtype, device=device)
    sources, q, dx = [randn(batch, T, d) for _ in range(N)], 0.1 * randn(batch, T, d), randn(batch, T, d)
    gamma, shift, scale = torch.ones(d, device=device), randn(batch, d), randn(batch, d)
    fwd_args = (sources, q, gamma, shift, scale, True, True)  # store h, save what the backward reads
    _, _, h32, lse = kernel.launch_forward(*fwd_args)
    dsources, accumulate = [torch.empty_like(s) for s in sources], [False] * N
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    bwd_args = (sources, dsources, accumulate, q, gamma, shift, scale, h32, lse, dx, None)
    kinds = {"fwd": (kernel._forward_kernel, lambda: kernel.launch_forward(*fwd_args),
                     kernel.traffic("aggregate", (sources, None, None, None, *fwd_args[1:]), sms)[0][0]),
             "bwd": (kernel._backward_kernel, lambda: kernel.launch_backward(*bwd_args),
                     kernel.traffic("aggregate_backward", bwd_args, sms)[0][0])}
    copy_gbs = measure_copy(16 * sources[0].numel() * sources[0].element_size(), device, do_bench)
    print(f"every config alone: B = {batch}, T = {T}, d = {d}, N = {N}, {dtype}; copy {copy_gbs:.0f} GB/s")
    print("| kernel | U | warps | stages | ms | GB/s | of copy | pinned |\n|---|---|---|---|---|---|---|---|")
    for kind, (k, run, nbytes) in kinds.items():
        saved = k.configs
        for c in kernel.CONFIGS[kind]:
            k.configs = [c]  # a single config runs without benchmarking
            ms = do_bench(run)
            pin = kernel.PINNED[kind]
            pinned = "yes" if (c.kwargs, c.num_warps) == (pin.kwargs, pin.num_warps) else ""
            print(f"| {kind} | {c.kwargs['U']} | {c.num_warps} | {c.kwargs['STAGES']} | {ms:.3f} | "
                  f"{nbytes / ms / 1e6:.0f} | {nbytes / ms / 1e6 / copy_gbs:.0%} | {pinned} |")
        k.configs = saved


def kernel_part(smoke):
    """Naive (dar.aggregate_reference under autograd, as the model runs it) vs fused, with a per-token (dynamic)
    query, printed as one table: forward / backward / both times and speed-ups, the fused path's GB/s against the minimum
    bytes each pass must move and as a fraction of a device-to-device copy measured in the same run, and the
    peak memory each path allocates above its inputs in the forward and in the backward. On a CPU (under
    TRITON_INTERPRET=1, for --smoke) the times are wall-clock medians and there is no memory."""
    import torch

    import dar
    import kernel

    batch, T, d, counts, dtype = ((2, 4, 16, (2, 3), torch.float32) if smoke else
                                  (32, 256, 1152, (5, 9, 18, 57), torch.bfloat16))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    do_bench = timer(device)

    def peak_above(fn, base):
        if not cuda:
            return float("nan"), fn()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        return torch.cuda.max_memory_allocated() - base, out

    torch.backends.cuda.matmul.allow_tf32 = False
    io = batch * T * d * torch.tensor([], dtype=dtype).element_size()  # bytes of one (B, T, d) tensor
    copy_gbs = measure_copy(16 * io, device, do_bench)
    name = torch.cuda.get_device_name(device) if cuda else "CPU (Triton interpreter)"
    print(f"{name}: B = {batch}, T = {T}, d = {d}, {dtype}, per-token query; device-to-device copy {copy_gbs:.0f} GB/s")
    head = (f"{'N':>3} {'LN':>3} | {'naive ms fwd':>12} {'bwd':>7} {'f+b':>7} | {'fused ms fwd':>12} {'bwd':>7} "
            f"{'f+b':>7} | {'speed-up fwd':>12} {'bwd':>6} {'f+b':>6} | {'GB/s fwd':>8} {'bwd':>6} | "
            f"{'of copy fwd':>11} {'bwd':>5} | {'peak MB fwd':>11} {'fused':>6} {'saved':>6} | "
            f"{'peak MB bwd':>11} {'fused':>6} {'saved':>6}")
    print(head + "\n" + "-" * len(head))
    for N in counts:
        for mod in (False, True):
            srcs = [torch.randn(batch, T, d, dtype=dtype, device=device, requires_grad=True) for _ in range(N)]
            q = (0.1 * torch.randn(batch, T, d, dtype=dtype, device=device)).requires_grad_()
            gamma = torch.ones(d, device=device, requires_grad=True)
            shift, scale = (torch.randn(batch, d, dtype=dtype, device=device, requires_grad=True) for _ in range(2))
            args = (srcs, q, gamma) + ((shift, scale) if mod else (None, None))
            inputs = srcs + [q, gamma] + ([shift, scale] if mod else [])
            dx = torch.randn(batch, T, d, dtype=dtype, device=device)
            res = {}
            for path, fn in (("naive", dar.aggregate_reference), ("fused", kernel.aggregate_fused)):
                fwd = lambda: fn(*args)[0]
                both = lambda: torch.autograd.grad(fwd(), inputs, dx)
                t_fwd, t_both = do_bench(fwd), do_bench(both)
                if cuda:
                    torch.cuda.synchronize()
                base = torch.cuda.memory_allocated() if cuda else 0
                peak_fwd, out = peak_above(fwd, base)
                peak_bwd, grads = peak_above(lambda y=out: torch.autograd.grad(y, inputs, dx), base)
                del out, grads
                res[path] = (t_fwd, t_both - t_fwd, t_both, peak_fwd / 1e6, peak_bwd / 1e6)
            (nf, nb, nfb, nmf, nmb), (ff, fb, ffb, fmf, fmb) = res["naive"], res["fused"]
            fwd_bytes = (N + 2) * io  # read the N sources and q once, write x
            bwd_bytes = (2 * N + 3) * io  # read the sources and q once, write every dv_i and dq, read dx
            gbs_f, gbs_b = fwd_bytes / ff / 1e6, bwd_bytes / fb / 1e6
            print(f"{N:>3} {'yes' if mod else 'no':>3} | {nf:>12.3f} {nb:>7.3f} {nfb:>7.3f} | {ff:>12.3f} {fb:>7.3f} "
                  f"{ffb:>7.3f} | {nf / ff:>11.1f}x {nb / fb:>5.1f}x {nfb / ffb:>5.1f}x | {gbs_f:>8.0f} {gbs_b:>6.0f} | "
                  f"{gbs_f / copy_gbs:>11.0%} {gbs_b / copy_gbs:>5.0%} | {nmf:>11.0f} {fmf:>6.0f} {1 - fmf / nmf:>6.0%} | "
                  f"{nmb:>11.0f} {fmb:>6.0f} {1 - fmb / nmb:>6.0%}")
    print("LN: with the fused LayerNorm + adaLN modulate. Times: medians (triton.testing.do_bench on a GPU); bwd ="
          "\n(fwd+bwd) - fwd. GB/s: minimum bytes (forward reads every source and q once and writes x; backward"
          "\nreads every source, q and dx once and writes every dv_i and dq) over the fused time. Peak MB: allocated"
          "\nabove the inputs during the forward (output included) and during the backward (the gradients included).")


def step_part(smoke):
    """`train.py --bench` for each routing in one table, with the ratio of step time to residual routing."""
    _, model, runs = parts(smoke)
    rows = []
    for routing, chunk in runs:
        out = subprocess.run(python("train.py", "--bench", *model, f"--routing={routing}", f"--chunk={chunk}"),
                             capture_output=True, text=True, cwd=HERE)
        if out.returncode:
            rows.append(f"| {routing} c{chunk} | failed: {out.stderr.strip().splitlines()[-1:]} |")
            continue
        rows.append(out.stdout.strip().splitlines()[-1])
    print("| device | model | routing | kernel | batch/GPU | step s | images/s | peak memory | MFU | x residual |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = None
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        if len(cells) < 9:
            print(row)
            continue
        images_per_s = float(cells[6])
        base = base or images_per_s
        print(row + f" {base / images_per_s:.3f} |")  # step time over residual routing's


def throughput_part(smoke):
    """Images/s of the SD-VAE encoder and of the sampler, on random weights of the real architectures."""
    import torch

    import sample
    import vae as vae_module
    from model import SiT_models

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn, reps):
        fn()  # warm up (and compile)
        sync()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return (time.perf_counter() - start) / reps

    size, batch = (32, 2) if smoke else (256, 32)
    encoder = vae_module.load_vae("random").to(device)
    images = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16):
        seconds = timed(lambda: encoder.encode(torch.cat([images, images.flip(3)])), 1 if smoke else 5)
    print(f"SD-VAE encoder, random weights, bf16 autocast, {size} px, both flips per image (as prepare_imagenet.py): "
          f"{batch / seconds:.1f} images/s")

    kwargs = dict(depth=2, hidden_size=32, num_heads=2, input_size=4) if smoke else {}
    name, steps = ("SiT-S/2", 2) if smoke else ("SiT-XL/2", 125)
    for routing in ("residual", "static"):
        model = SiT_models[name](routing=routing, **kwargs).to(device).eval()
        cfg = model.config
        z = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)
        y = torch.randint(0, cfg.num_classes, (batch,), device=device)
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16):
            seconds = timed(lambda: sample.sample_ode(model, z, y, num_steps=steps, cfg_scale=1.5), 1)
        print(f"sampling {name} {routing}{' c4' if routing != 'residual' else ''}, Heun {steps} steps ({2 * steps} evaluations), guidance 1.5, bf16, "
              f"batch {batch}: {batch / seconds:.2f} images/s (latents; decoding not included)")


def exact_part(smoke, workdir):
    """Losses of two identical runs and of a run stopped at step 3 and resumed, compared bit for bit."""
    model = ["--model=SiT-S/4", "--depth=2", "--hidden-size=32", "--num-heads=2"] if smoke else ["--model=SiT-B/2"]
    common = ["--data=shapes", "--image-size=8" if smoke else "--image-size=32", *model, "--routing=dynamic",
              "--chunk=4", "--global-batch-size=2" if smoke else "--global-batch-size=32", "--log-every=1",
              "--eval-every=0", "--sample-every=0", "--ckpt-every=3",
              "--precision=fp32" if smoke else "--precision=bf16", "--kernel=triton"]

    def run(name, steps, *extra):
        subprocess.run(python("train.py", *common, f"--max-steps={steps}", f"--results-dir={workdir}/{name}", *extra),
                       check=True, capture_output=True, cwd=HERE)
        with open(os.path.join(workdir, name, "log.jsonl")) as f:
            return [r["loss"] for r in map(json.loads, f) if "loss" in r]

    a, b = run("a", 6), run("b", 6)
    run("c", 3)
    c = run("c", 6, f"--resume={workdir}/c/checkpoints/0000003.pt")
    print(f"run a:             {a}\nrun b:             {b}\nstopped, resumed:  {c}")
    print(f"two runs identical: {a == b}; resumed run identical: {a == c}")
    if not (a == b == c):
        raise SystemExit("losses differ")


def environment():
    import torch
    import triton

    lines = [f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- torch {torch.__version__}, Triton {triton.__version__}, Python {platform.python_version()}"]
    if torch.cuda.is_available():
        lines.insert(0, f"- device: {torch.cuda.get_device_name()} ({torch.cuda.device_count()} visible)")
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        lines.insert(1, f"- driver: {smi.stdout.strip() or 'unknown'}; CUDA {torch.version.cuda}")
    else:
        lines.insert(0, "- device: CPU (smoke run, Triton interpreter): no figure here is a GPU's")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on a CPU, to check that this script still runs")
    p.add_argument("--out", help="the report's path (default docs/gpu/<date>-<device>.md; results/ with --smoke)")
    p.add_argument("--part", choices=("kernel", "configs", "step", "throughput", "exact"),
                   help="run one part alone and print its output (no report)")
    p.add_argument("--workdir", default=os.path.join(HERE, "results", "gpu_check"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernel.py loads (the parts import it)
    if args.part:
        return {"kernel": lambda: kernel_part(args.smoke), "configs": lambda: configs_part(args.smoke),
                "step": lambda: step_part(args.smoke), "throughput": lambda: throughput_part(args.smoke),
                "exact": lambda: exact_part(args.smoke, args.workdir)}[args.part]()

    import torch

    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py measures on a CUDA GPU; on a CPU, python gpu_check.py --smoke checks that it runs")
    env = dict(os.environ)
    if args.smoke:
        env["TRITON_INTERPRET"] = "1"
    stamp = datetime.datetime.now(datetime.timezone.utc)
    device = "cpu-smoke" if args.smoke else torch.cuda.get_device_name().replace(" ", "-")
    out = args.out or os.path.join(HERE, "results" if args.smoke else "docs/gpu", f"{stamp:%Y-%m-%d}-{device}.md")
    workdir = os.path.join(args.workdir, f"{stamp:%Y%m%d-%H%M%S}")
    report = ["# GPU check", "", "`python gpu_check.py" + (" --smoke`" if args.smoke else "`"), "", *environment(), ""]
    failed = []
    for name, limit, cmd in parts(args.smoke)[0]:
        if name == "exact":
            cmd = cmd + [f"--workdir={workdir}"]
        start = time.time()
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=env, cwd=HERE)
            status = "ok" if run.returncode == 0 else f"failed (exit {run.returncode})"
            text = run.stdout + (run.stderr[-3000:] if run.returncode else "")
        except subprocess.TimeoutExpired as e:
            status = f"stopped at its limit of {limit} s"
            text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        if status != "ok":
            failed.append(name)
        report += [f"## {name}: {status}, {time.time() - start:.0f} s", "", f"`{' '.join(cmd[1:])}`", "", "```",
                   text.strip()[-12000:], "```", ""]
        print(f"{name}: {status} ({time.time() - start:.0f} s)", flush=True)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write("\n".join(report))
    print(f"report: {out}" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
