"""
Every figure that only a GPU can give, in one command, for a session that is lent one:

    python gpu_check.py            on one CUDA GPU: at most 9.3 minutes, compiles included; no network, no data
    python gpu_check.py --smoke    the same code at tiny sizes on a CPU (Triton's interpreter), in about a minute

Its own file because it drives the others (kernel.py, train.py, sample.py, vae.py, test_parity.py) as a user
would, each part in a subprocess with its own time limit, so a slow or failing part is reported and the others
still run. It writes one Markdown report (device, driver, versions, date, then each part's output) under
docs/gpu/ (--smoke: under results/), and prints it. The parts:
  1. parity      the kernel against fp64 at full size (B = 4, T = 256): the 24 cases of N in {18, 57} at
                 d = 1152, every config at N = 57, and the whole model on the kernel vs the reference path
  2. kernel      `python kernel.py`: naive vs fused at N in {5, 9, 18, 57}, fraction of copy bandwidth, memory;
                 `python kernel.py --configs`: every config of each kernel timed alone at N = 57 (to choose PINNED)
  3. step        `train.py --bench` at SiT-XL/2, batch 32: residual, static c4, dynamic c4, static dense, with
                 step time, images/s, peak memory, MFU and the ratio to residual
  4. throughput  SD-VAE encoding images/s (random weights, bf16, 256 px, as prepare_imagenet.py runs it) and
                 sample.py's images/s at SiT-XL/2 (Heun, 125 steps = 250 evaluations, guidance 1.5)
  5. exact       two identical 6-step training runs and one stopped at step 3 and resumed give identical losses
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

from data import HelpFormatter

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
        ("kernel", 60 if smoke else 75, python("kernel.py", *flag)),
        ("configs", 60, python("kernel.py", "--configs", *flag)),
        ("step", 60 if smoke else 140, python(__file__, "--part=step", *flag)),
        ("throughput", 60, python(__file__, "--part=throughput", *flag)),
        ("exact", 60 if smoke else 80, python(__file__, "--part=exact", *flag)),
    ], xl, bench


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
    p.add_argument("--part", choices=("step", "throughput", "exact"), help=argparse.SUPPRESS)  # run by main itself
    p.add_argument("--workdir", default=os.path.join(HERE, "results", "gpu_check"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.part:
        return {"step": lambda: step_part(args.smoke), "throughput": lambda: throughput_part(args.smoke),
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
