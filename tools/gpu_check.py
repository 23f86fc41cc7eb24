"""
Every figure that only a GPU can give, in one command, for a session that is lent one:

    python tools/gpu_check.py            on one CUDA GPU: at most 6 minutes, compiles included; no network, no data
    python tools/gpu_check.py --plan     the parts, in order, with their time limits
    python tools/gpu_check.py --smoke    the same code at tiny sizes on a CPU (Triton's interpreter; limits x 3)
    python tools/gpu_check.py --part=kernel    one part alone, printed (any part named below)

The report goes to $OUT/gpu_check.md when OUT is set (the one folder a lent machine sends back), else to
docs/gpu/<date>-<device>.md (--smoke: results/), and is rewritten every few seconds while the parts run, so a
run stopped at any moment leaves everything measured until then. The last thing printed is a summary that fits
in 12,000 characters. Each part runs as a child process of its own (unbuffered, in its own process group, killed
as a group at its limit), so a slow or failing part is reported with its output so far and the others still
run. In order of value, so that a run stopped early brings back the most:
  1. parity      the kernel against fp64 on the hardware: backward determinism, sources anywhere in memory,
                 ragged backward programs, shared gradient buffers, config timing, then full-size cases
                 (N in {57, 18}, d = 1152), every config, the model on the kernel vs the reference path
  2. kernel      the raw kernels (tables and buffers built beforehand, CUDA graphs) at N in {5, 9, 18, 57}
                 and at batch 256: time, GB/s of the bytes kernel.traffic counts, fraction of a copy; and the
                 whole op (host work included) against the reference path
  3. step        `train.py --bench` at SiT-XL/2 and SiT-B/2, batch 32: residual, static c4, dynamic c4,
                 static dense, with step time, images/s, peak memory, MFU and the ratio to residual; one
                 torchrun step, one --compile row, peak memory at batch 256 with --grad-checkpoint
  4. configs     every config of each kernel timed alone at N in {5, 9, 57} (kernel.PINNED is chosen by this)
  5. throughput  SD-VAE encoding images/s (random weights, bf16, 256 px, as prepare_imagenet.py runs it) and
                 sample.py's images/s at SiT-XL/2 (Heun, 125 steps = 250 evaluations, guidance 1.5)
  6. exact       two identical 6-step training runs and one stopped at step 3 and resumed give identical losses
"""
import argparse
import contextlib
import datetime
import gc
import io
import json
import os
import platform
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, where the scripts are
sys.path.insert(0, ROOT)

from cli import HelpFormatter  # noqa: E402

# (part, time limit in s), in the order they run; the limits add up to 360 s, a third of what a lent machine
# gives a session once it has started, so that a failed run can be rerun.
PLAN = [("parity", 75), ("kernel", 45), ("step", 110), ("configs", 40), ("throughput", 40), ("exact", 50)]
# Parity on the hardware: first the tests whose result depends on it (rounding, memory layout, scheduling),
# then full-size cases, every config and the whole model.
PARITY = ["test_backward_is_deterministic", "test_sources_that_start_anywhere_in_memory",
          "test_strided_queries_and_modulations_and_ragged_backward_programs",
          "test_timing_configs_never_adds_into_the_live_gradient_buffers",
          "test_shared_gradient_buffers_under_micro_batches_checkpointing_and_partial_backward",
          *(f"test_fused_matches_fp64_reference[N{n}-d1152-{q}-{ln}-{dt}]" for n in (57, 18)
            for q in ("static", "explicit", "dynamic") for ln in ("LN", "noLN") for dt in ("bfloat16", "float32")),
          "test_every_autotune_config_matches_fp64_reference", "test_model_on_kernel_matches_reference",
          "test_model_on_kernel_under_bf16_autocast_matches_reference", "test_model_on_kernel_compiles_fullgraph"]
SMOKE_PARITY = ["test_backward_is_deterministic", "test_fused_matches_fp64_reference[N2-d72-static-noLN-float32]"]


def python(*args):
    return [sys.executable, *args]


def command(name, smoke, workdir):
    """The child process of part `name`."""
    if name == "parity":
        tests = [f"test_parity.py::{t}" for t in (SMOKE_PARITY if smoke else PARITY)]
        return python("-m", "pytest", "-v", "-p", "no:cacheprovider", *tests, f"--basetemp={workdir}/parity")
    return python(__file__, f"--part={name}", f"--workdir={workdir}", *(["--smoke"] if smoke else []))


#################################################################################
#                                   Timing                                      #
#################################################################################

def timer(device, graph=True):
    """A function timing a function in ms: on a GPU the median of a CUDA graph's replays (no launch overhead;
    triton.testing.do_bench without `graph` or where a function cannot be captured), on a CPU of 3 wall-clock
    runs (under TRITON_INTERPRET=1, only to exercise the code)."""
    if device.type == "cuda":
        from triton import testing

        def on_gpu(fn):
            if graph:
                with contextlib.suppress(Exception):  # a host-side synchronisation, an op that cannot be captured
                    return testing.do_bench_cudagraph(fn, return_mode="median")
            return testing.do_bench(fn, return_mode="median")
        return on_gpu

    def on_cpu(fn, reps=3):
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[reps // 2]
    return on_cpu


def measure_copy(nbytes, device, do_bench):
    """GB/s of a device-to-device copy of `nbytes` (read and written)."""
    import torch

    src, dst = (torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(2))
    return 2 * nbytes / do_bench(lambda: dst.copy_(src)) / 1e6


def working_point(batch, T, d, N, dtype, device, seed=0):
    """The kernels' inputs as the model gives them at a dynamic-routing aggregation with the next sublayer's
    LayerNorm fused: N sources, a per-token query, gamma, the adaLN shift and scale, and dL/dx."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, device=device).to(dtype)
    sources = [randn(batch, T, d) for _ in range(N)]
    return sources, 0.1 * randn(batch, T, d), torch.ones(d, device=device), randn(batch, d), randn(batch, d), \
        randn(batch, T, d)


def raw_launches(batch, T, d, N, dtype, device):
    """The forward and backward launches at the working point, their tables and buffers built beforehand, and the
    bytes each moves (kernel.traffic): {"fwd": (launch, bytes), "bwd": (launch, bytes)}."""
    import torch

    import kernel

    sources, q, gamma, shift, scale, dx = working_point(batch, T, d, N, dtype, device)
    fwd_args = (sources, q, gamma, shift, scale, False, True)  # save what the backward reads, as training does
    fwd, _, (_, _, h32, lse) = kernel.forward_call(*fwd_args)
    fwd(kernel._configs("fwd")[0])
    bwd_args = (sources, [torch.empty_like(s) for s in sources], [False] * N, q, gamma, shift, scale, h32, lse, dx,
                None)
    bwd, _, _ = kernel.backward_call(*bwd_args)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    return {"fwd": (fwd, kernel.traffic("aggregate", (sources, None, None, None, *fwd_args[1:]), sms)[0][0]),
            "bwd": (bwd, kernel.traffic("aggregate_backward", bwd_args, sms)[0][0])}


def describe(config):
    return f"U = {config.kwargs['U']}, {config.num_warps} warps, {config.kwargs['STAGES']} stages"


def devices():
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    return device, timer(device)


#################################################################################
#                                    Parts                                      #
#################################################################################

def kernel_part(smoke):
    """The raw kernels at the working point, then the whole op (autograd, host work, tables) and the reference."""
    import torch

    import dar
    import kernel

    device, do_bench = devices()
    d, dtype, T = (16, torch.float32, 4) if smoke else (1152, torch.bfloat16, 256)
    rows = [(2, 2), (2, 3)] if smoke else [(32, 5), (32, 9), (32, 18), (32, 57), (256, 9)]  # (batch, N)
    io_bytes = rows[-1][0] * T * d * torch.tensor([], dtype=dtype).element_size()
    copy_gbs = measure_copy(4 * io_bytes, device, do_bench)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    print(f"{name}: T = {T}, d = {d}, {dtype}, per-token query, LayerNorm fused, h saved; copy {copy_gbs:.0f} GB/s; "
          f"fwd {describe(kernel._configs('fwd')[0])}, bwd {describe(kernel._configs('bwd')[0])}")
    print("| batch | N | fwd ms | fwd GB/s | of copy | bwd ms | bwd GB/s | of copy | op f+b ms | reference f+b ms | "
          "op / reference |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for batch, N in rows:
        launches = raw_launches(batch, T, d, N, dtype, device)
        cells = []
        for kind in ("fwd", "bwd"):
            launch, nbytes = launches[kind]
            config = kernel._configs(kind)[0]
            ms = do_bench(lambda: launch(config))
            cells += [f"{ms:.4f}", f"{nbytes / ms / 1e6:.0f}", f"{nbytes / ms / 1e6 / copy_gbs:.0%}"]
        del launches
        sources, q, gamma, shift, scale, dx = working_point(batch, T, d, N, dtype, device)
        inputs = [t.requires_grad_() for t in sources + [q, gamma, shift, scale]]
        both = {}
        for path, fn in (("op", kernel.aggregate_fused), ("reference", dar.aggregate_reference)):
            step = lambda fn=fn: torch.autograd.grad(fn(sources, q, gamma, shift, scale)[0], inputs, dx)
            both[path] = timer(device, graph=False)(step)  # as training calls it: host work included
        print(f"| {batch} | {N} | " + " | ".join(cells) + f" | {both['op']:.3f} | {both['reference']:.3f} | "
              f"{both['op'] / both['reference']:.2f} |")
        gc.collect()
    print("Raw: one launch of the kernel alone, its table and buffers made beforehand (what training adds on top: "
          "the table's copy, the allocations, autograd). GB/s: the bytes kernel.traffic counts (forward: every "
          "source, q, the modulation, x, h32 and lse; backward: the sources, q, dx, h32, lse, every dv_i and the "
          "partial sums) over the time.")


def configs_part(smoke):
    """Every config each kernel may run (kernel.CONFIGS), timed alone at the working point at several N, in ms and
    in GB/s of the bytes kernel.traffic counts, also as a fraction of a copy; the pinned one marked."""
    import torch

    import kernel

    device, do_bench = devices()
    batch, T, d, counts, dtype = (2, 4, 16, (3,), torch.float32) if smoke else (32, 256, 1152, (5, 9, 57),
                                                                                  torch.bfloat16)
    candidates = {kind: kernel.CONFIGS[kind] if device.type == "cuda" else kernel._configs(kind)
                  for kind in ("fwd", "bwd")}
    copy_gbs = measure_copy(4 * batch * T * d * torch.tensor([], dtype=dtype).element_size(), device, do_bench)
    print(f"every config alone: B = {batch}, T = {T}, d = {d}, {dtype}; copy {copy_gbs:.0f} GB/s")
    print("| kernel | N | U | warps | stages | ms | GB/s | of copy | pinned |\n|---|---|---|---|---|---|---|---|---|")
    for N in counts:
        launches = raw_launches(batch, T, d, N, dtype, device)
        for kind, (launch, nbytes) in launches.items():
            pin = kernel.PINNED[kind]
            for c in candidates[kind]:
                ms = do_bench(lambda: launch(c))
                pinned = "yes" if (c.kwargs, c.num_warps) == (pin.kwargs, pin.num_warps) else ""
                print(f"| {kind} | {N} | {c.kwargs['U']} | {c.num_warps} | {c.kwargs['STAGES']} | {ms:.4f} | "
                      f"{nbytes / ms / 1e6:.0f} | {nbytes / ms / 1e6 / copy_gbs:.0%} | {pinned} |")
        del launches
        gc.collect()


def step_part(smoke, workdir):
    """`train.py --bench` rows, each model's routings with the ratio of its step time to residual routing's."""
    import torch

    import train

    tiny = ["--depth=2", "--hidden-size=32", "--num-heads=2", "--image-size=64", "--bench-steps=1"]
    models = ({"SiT-XL/2": ["--model=SiT-S/2", *tiny]} if smoke else  # one tiny stand-in for both
              {name: [f"--model={name}", "--bench-steps=10"] for name in ("SiT-XL/2", "SiT-B/2")})
    batch = "--global-batch-size=2" if smoke else "--global-batch-size=32"
    routings = [("residual", 4), ("static", 4), ("dynamic", 4), ("static", 1)][:2 if smoke else 4]

    def bench(*flags):
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                train.main(train.parse_args(["--bench", f"--results-dir={workdir}/bench", *flags]))
            return out.getvalue().strip().splitlines()[-1]
        except Exception as e:  # out of memory, say: the next row may still fit
            return f"| failed: {type(e).__name__}: {str(e).splitlines()[0][:200]} |"
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    print("| device | model | routing | kernel | batch/GPU | step s | images/s | peak memory | MFU | x residual |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for flags in models.values():
        base = None
        for routing, chunk in routings:
            row = bench(batch, *flags, f"--routing={routing}", f"--chunk={chunk}")
            cells = [c.strip() for c in row.strip("|").split("|")]
            if len(cells) < 9:
                print(row)
                continue
            step_s = float(cells[5])
            base = step_s if routing == "residual" else base
            print(row + (f" {step_s / base:.3f} |" if base else " - |"))
    xl, b2 = models["SiT-XL/2"], models.get("SiT-B/2", models["SiT-XL/2"])
    print("Peak memory at batch 256 with --grad-checkpoint:")
    print(bench("--global-batch-size=8" if smoke else "--global-batch-size=256", *xl, "--grad-checkpoint",
                "--routing=static", "--chunk=4", "--bench-steps=1" if smoke else "--bench-steps=3"))
    if smoke:
        print("--compile: left out with --smoke (Inductor's CPU compile takes minutes)")
    else:
        print("--compile:")
        print(bench(batch, *b2, "--routing=dynamic", "--chunk=4", "--compile"))
    print("torchrun --nproc_per_node=1 (DDP; NCCL on a GPU, gloo on a CPU):")
    run = subprocess.run(python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py",
                                "--bench", batch, *b2, "--routing=dynamic", "--chunk=4",
                                f"--results-dir={workdir}/torchrun"), cwd=ROOT, capture_output=True, text=True)
    lines = (run.stdout + run.stderr).strip().splitlines()
    print(lines[-1] if run.returncode == 0 and lines else f"failed (exit {run.returncode}): " + "\n".join(lines[-8:]))


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
        print(f"sampling {name} {routing}{' c4' if routing != 'residual' else ''}, Heun {steps} steps "
              f"({2 * steps} evaluations), guidance 1.5, bf16, batch {batch}: {batch / seconds:.2f} images/s "
              "(latents; decoding not included)")


def exact_part(smoke, workdir):
    """Losses of two identical runs and of a run stopped at step 3 and resumed, compared bit for bit."""
    model = ["--model=SiT-S/4", "--depth=2", "--hidden-size=32", "--num-heads=2"] if smoke else ["--model=SiT-B/2"]
    common = ["--data=shapes", "--image-size=8" if smoke else "--image-size=32", *model, "--routing=dynamic",
              "--chunk=4", "--global-batch-size=2" if smoke else "--global-batch-size=32", "--log-every=1",
              "--eval-every=0", "--sample-every=0", "--ckpt-every=3",
              "--precision=fp32" if smoke else "--precision=bf16", "--kernel=torch" if smoke else "--kernel=triton"]

    os.makedirs(workdir, exist_ok=True)

    def start(name, steps, *extra):
        cmd = python("train.py", *common, f"--max-steps={steps}", f"--results-dir={workdir}/{name}", *extra)
        err = open(os.path.join(workdir, f"{name}-{steps}.err"), "w+")
        return name, cmd, err, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)

    def losses(name, cmd, err, proc):
        if proc.wait():
            err.seek(0)
            raise SystemExit(f"{' '.join(cmd[1:])} failed (exit {proc.returncode}):\n{err.read()[-3000:]}")
        with open(os.path.join(workdir, name, "log.jsonl")) as f:
            return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]

    first = [start("a", 6), start("b", 6), start("c", 3)]  # at once: they share nothing but the device
    a, b, _ = (losses(*run) for run in first)
    c = losses(*start("c", 6, f"--resume={workdir}/c/checkpoints/0000003.pt"))
    print(f"run a:             {a}\nrun b:             {b}\nstopped, resumed:  {c}")
    for label, other in (("two runs", b), ("resumed run", c)):
        differ = [step for (step, x), (_, y) in zip(a, other) if x != y]
        same = len(a) == len(other) and not differ
        print(f"{label} identical: {same}" + ("" if same else f"; first step that differs: {differ[:1] or 'length'}"))
    if not (a == b == c):
        raise SystemExit("losses differ")


PARTS = {"kernel": lambda a: kernel_part(a.smoke), "configs": lambda a: configs_part(a.smoke),
         "step": lambda a: step_part(a.smoke, a.workdir), "throughput": lambda a: throughput_part(a.smoke),
         "exact": lambda a: exact_part(a.smoke, a.workdir)}


#################################################################################
#                               Running the plan                                #
#################################################################################

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


def run_part(cmd, limit, log_path, env, on_progress):
    """Run one part's child in a process group of its own, its output into log_path, calling on_progress()
    every few seconds; kill the whole group at the limit. Returns (status, seconds)."""
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=ROOT, start_new_session=True)
        try:
            while True:
                try:
                    code = proc.wait(timeout=max(0.1, min(5.0, start + limit - time.time())))
                    break
                except subprocess.TimeoutExpired:
                    if time.time() >= start + limit:
                        code = None
                        break
                    on_progress()
        finally:  # at the limit, or if this process is itself interrupted: nothing of the part is left running
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    status = "ok" if code == 0 else f"failed (exit {code})" if code is not None else f"stopped at its limit of {limit:.0f} s"
    return status, time.time() - start


def summary(results, budget=11_000):
    """The table of parts, then each part's last lines, in at most `budget` characters, table last."""
    table = ["| part | status | s |", "|---|---|---|"] + [f"| {n} | {s} | {t:.0f} |" for n, s, t, _ in results]
    room = (budget - len("\n".join(table))) // max(1, len(results))
    tails = []
    for name, status, _, text in results:
        tail = text.strip()[-max(0, room - 40):]
        tails += [f"--- {name} ({status}), its last lines:", tail]
    return "\n".join(tails + table)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on a CPU, to check that this script still runs")
    p.add_argument("--plan", action="store_true", help="print the parts and their time limits, and exit")
    p.add_argument("--limit-scale", type=float, default=1.0, help="multiply every part's time limit by this")
    p.add_argument("--out", help="the report's path (default $OUT/gpu_check.md, else docs/gpu/<date>-<device>.md; "
                                 "results/ with --smoke)")
    p.add_argument("--part", choices=list(PARTS), help="run one part alone and print its output (no report)")
    p.add_argument("--workdir", default=os.path.join(ROOT, "results", "gpu_check"),
                   help="where the parts write their runs")
    args = p.parse_args()
    if args.limit_scale <= 0:
        p.error("--limit-scale must be positive")
    scale = args.limit_scale * (3 if args.smoke else 1)  # a CPU under Triton's interpreter is slower at everything
    if args.plan:
        for name, limit in PLAN:
            print(f"{name:<11} {limit * scale:6.0f} s")
        print(f"{'total':<11} {sum(limit for _, limit in PLAN) * scale:6.0f} s")
        return 0
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernel.py loads (the parts import it)
    if args.part:
        print(f"{args.part}: started", flush=True)  # before torch loads, so that even a part stopped at once says so
        os.makedirs(args.workdir, exist_ok=True)
        return PARTS[args.part](args)

    import torch

    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py measures on a CUDA GPU; on a CPU, python tools/gpu_check.py --smoke checks "
                         "that it runs")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.smoke:
        env["TRITON_INTERPRET"] = "1"
    stamp = datetime.datetime.now(datetime.timezone.utc)
    device = "cpu-smoke" if args.smoke else torch.cuda.get_device_name().replace(" ", "-")
    default = (os.path.join(os.environ["OUT"], "gpu_check.md") if os.environ.get("OUT") else
               os.path.join(ROOT, "results" if args.smoke else "docs/gpu", f"{stamp:%Y-%m-%d}-{device}.md"))
    out = args.out or default
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    workdir = os.path.join(args.workdir, f"{stamp:%Y%m%d-%H%M%S}")
    os.makedirs(workdir, exist_ok=True)
    head = ["# GPU check", "", "`python tools/gpu_check.py" + (" --smoke" if args.smoke else "") +
            (f" --limit-scale={args.limit_scale}" if args.limit_scale != 1 else "") + "`", "", *environment(), ""]
    results = []  # (part, status, seconds, output)

    def write(running=None):
        sections = []
        for name, status, seconds, text in results + ([running] if running else []):
            cmd = command(name, args.smoke, workdir)
            sections += [f"## {name}: {status}, {seconds:.0f} s", "", f"`{' '.join(cmd[1:])}`", "", "```",
                         text.strip(), "```", ""]
        with open(out + ".tmp", "w") as f:
            f.write("\n".join(head + sections))
        os.replace(out + ".tmp", out)  # a reader (or a stop) never sees half a report

    for name, limit in PLAN:
        limit *= scale
        log_path = os.path.join(workdir, f"{name}.log")
        start = time.time()
        read = lambda: open(log_path, errors="replace").read() if os.path.exists(log_path) else ""
        write((name, "running", 0, ""))
        status, seconds = run_part(command(name, args.smoke, workdir), limit, log_path, env,
                                   lambda: write((name, "running", time.time() - start, read())))
        results.append((name, status, seconds, read()))
        write()
        print(f"{name}: {status} ({seconds:.0f} s)", flush=True)
    print(f"report: {out}\n")
    print(summary(results))
    return 0 if all(status == "ok" for _, status, _, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
