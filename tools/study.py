"""
The paper's claims at its own depth, on the CPU: narrow SiTs of 28 blocks (SiT-XL/2's depth, L = 56 sublayers)
trained on the toy shapes with one recipe, differing only in routing, three seeds each:

    python tools/study.py --jobs=2        every run, then the report (about 3 hours on 2 cores; resumable)
    python tools/study.py --report-only   the report from the runs finished so far
    python tools/study.py --report-only --publish=docs/study28    and a copy of it and its figures under docs/

Runs (all static routing unless named): at 28 blocks residual, static / explicit / dynamic c4, and static with
chunk S in {1, 2, 4, 8, 14}; at 8 blocks (L = 16) the same S sweep. The paper's chunk analysis (section 5.5,
Eq. 9) predicts a U-shaped cost in S with its optimum growing as sqrt(L): S* in [3.7, 4.9] at L = 56, and
sqrt(16 / 56) of that, [2.0, 2.6], at L = 16.

Resumable run by run: each run lives in OUT/<depth>/<name>-s<seed>; one that holds its last checkpoint is done
and skipped, one that was stopped part-way continues from its latest checkpoint (train.py --resume=latest,
bit-exact), one never started starts. So a stopped study continues where it stopped, across sessions.

The report (OUT/REPORT.md; --publish=DIR copies it and its figures there) gives the held-out velocity
loss of the EMA weights at fixed steps, mean and standard deviation over seeds, with Welch's t-test of each
DAR variant against residual routing; the toy accuracy of EMA samples (toy_accuracy.py); the S sweep as a plot
of loss against S for both depths with the predicted optima marked; and diagnose.py's measures for residual
vs DAR at 28 blocks. It states numbers only: the verdict per claim is written from them, in docs/study.md.
"""
import argparse
import concurrent.futures
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from scipy import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, where the scripts are
sys.path.insert(0, ROOT)

from cli import HelpFormatter  # noqa: E402
SWEEP = (1, 2, 4, 8, 14)
PREDICTED = {28: (3.7, 4.9), 8: (3.7 * (16 / 56) ** 0.5, 4.9 * (16 / 56) ** 0.5)}  # Eq. (9): S* grows as sqrt(L)


def recipe(tiny):
    """(train.py flags shared by every run, seeds, steps): the study's one recipe, or a seconds-long one."""
    if tiny:
        return (["--data=shapes", "--image-size=8", "--model=SiT-S/4", "--hidden-size=16", "--num-heads=2",
                 "--global-batch-size=4", "--lr=3e-3", "--ema-decay=0.9", "--log-every=2", "--eval-every=2",
                 "--eval-samples=8", "--sample-every=0", "--ckpt-every=2", "--precision=fp32"], (0, 1), 4)
    return (["--data=shapes", "--image-size=16", "--model=SiT-S/4", "--hidden-size=64", "--num-heads=4",
             "--global-batch-size=32", "--lr=3e-3", "--ema-decay=0.998", "--log-every=250", "--eval-every=500",
             "--eval-samples=256", "--sample-every=0", "--ckpt-every=500", "--precision=fp32"], (0, 1, 2), 1500)


def runs(tiny):
    """[(depth, name, routing, chunk)]: every configuration of the study (tiny: depths 4 and 2, S = 1 and 4)."""
    deep, shallow, sweep = (4, 2, (1, 4)) if tiny else (28, 8, SWEEP)
    variants = ("static",) if tiny else ("static", "explicit", "dynamic")
    out = [(deep, "residual", "residual", 4)] + [(deep, f"{r} c4", r, 4) for r in variants]
    out += [(deep, f"static S={s}", "static", s) for s in sweep if s != 4]
    out += [(shallow, f"static S={s}", "static", s) for s in sweep]
    return out


def run_dir(out, depth, name, seed):
    return os.path.join(out, f"depth{depth}", f"{name.replace(' ', '_').replace('=', '')}-s{seed}")


def last_checkpoint(path, steps):
    return os.path.join(path, "checkpoints", f"{steps:07d}.pt")


def finished(path, steps):
    """Whether the run in `path` holds its last checkpoint."""
    return os.path.exists(last_checkpoint(path, steps))


def train(out, tiny, log=print, jobs=1):
    """Every run not yet finished, `jobs` at a time (each with its share of the CPU's threads: these narrow
    models run faster as two one-thread processes than as one two-thread one); returns how many were trained
    (or continued) now."""
    common, seeds, steps = recipe(tiny)
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    pending = [(depth, name, routing, chunk, seed) for depth, name, routing, chunk in runs(tiny) for seed in seeds
               if not finished(run_dir(out, depth, name, seed), steps)]

    def one(depth, name, routing, chunk, seed):
        path = run_dir(out, depth, name, seed)
        resume = ["--resume=latest"] if glob.glob(os.path.join(path, "checkpoints", "*.pt")) else []
        if not resume and os.path.isdir(path):
            shutil.rmtree(path)  # a run stopped before its first checkpoint: start it again
        start = time.time()
        subprocess.run([sys.executable, "train.py", *common, f"--depth={depth}", f"--routing={routing}",
                        f"--chunk={chunk}", f"--seed={seed}", f"--max-steps={steps}", f"--results-dir={path}",
                        *resume], cwd=ROOT, check=True, capture_output=True,
                       env={**os.environ, "OMP_NUM_THREADS": threads})
        log(f"depth {depth} {name} seed {seed}: {time.time() - start:.0f} s")

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(one, *run) for run in pending]
        try:
            for done in concurrent.futures.as_completed(futures):
                done.result()
        except BaseException:  # a failed run stops the study with its error; the runs under way finish first
            pool.shutdown(cancel_futures=True)
            raise
    return len(pending)


def losses(out, tiny):
    """{(depth, name): {step: [EMA held-out loss per seed]}} of the finished runs."""
    _, seeds, steps = recipe(tiny)
    table = {}
    for depth, name, _, _ in runs(tiny):
        for seed in seeds:
            path = run_dir(out, depth, name, seed)
            if not finished(path, steps):
                continue
            with open(os.path.join(path, "log.jsonl")) as f:
                for record in map(json.loads, f):
                    if "eval_loss_ema" in record:
                        table.setdefault((depth, name), {}).setdefault(record["step"], []).append(record["eval_loss_ema"])
    return table


def run_seconds(path):
    """One run's training time from its log: each log line's steps over its steps/s, which covers every step and
    the evaluations and checkpoints between log lines, but not a process's start-up or what it did after its
    last log line."""
    total, last = 0.0, 0
    with open(os.path.join(path, "log.jsonl")) as f:
        for record in map(json.loads, f):
            if "resumed" in record:
                last = record["step"]
            elif "steps_per_s" in record:
                total, last = total + (record["step"] - last) / record["steps_per_s"], record["step"]
    return total


def chunk_sweep(table, depth, tiny):
    """{S: [EMA held-out loss per seed at the last step]} of static DAR at this depth (its c4 run is S = 4)."""
    chunks = {(d, name): chunk for d, name, routing, chunk in runs(tiny) if d == depth and routing == "static"}
    return {chunks[key]: table[key][max(table[key])] for key in sorted(chunks, key=chunks.get) if key in table}


def optimum(sweep, draws=2000, seed=0):
    """Where the loss is lowest in S, from a parabola in log S fitted to the seed means (Eq. 9's cost adds a term
    that falls with S to one that grows with it; a parabola in log S is the simplest U). Returns (S* of the fit,
    None when it opens downward or its vertex lies outside the sweep; the 5th and 95th percentiles of S* over
    bootstrap resamples of each S's seeds, None when no resample has a minimum inside; the share of resamples
    that do)."""
    sizes = sorted(sweep)
    x = np.log(sizes)

    def vertex(means):
        a, b, _ = np.polyfit(x, means, 2)
        return float(np.exp(-b / (2 * a))) if a > 0 and x[0] <= -b / (2 * a) <= x[-1] else None

    rng = np.random.default_rng(seed)
    fitted = vertex([np.mean(sweep[s]) for s in sizes])
    resampled = [vertex([rng.choice(sweep[s], len(sweep[s])).mean() for s in sizes]) for _ in range(draws)]
    inside = [v for v in resampled if v is not None]
    low, high = map(float, np.percentile(inside, [5, 95])) if inside else (None, None)
    return fitted, low, high, len(inside) / draws


def welch(values, against):
    """Welch's t-test p of two samples as the report prints it; "-" when either has fewer than two values."""
    if len(values or []) < 2 or len(against or []) < 2:
        return "-"
    return f"{stats.ttest_ind(values, against, equal_var=False).pvalue:.3f}"


def flag(flags, name):
    return next(f.split("=", 1)[1] for f in flags if f.startswith(f"--{name}="))


def evaluate(out, tiny, log=print):
    """The diagnostics of residual routing vs static and dynamic c4 (seed 0) and the toy accuracy of every
    seed's EMA samples at the deep depth, each kept in a file and skipped when it exists (so they resume too)."""
    _, seeds, steps = recipe(tiny)
    deep = max(d for d, _, _, _ in runs(tiny))
    ckpt = lambda name, seed: last_checkpoint(run_dir(out, deep, name, seed), steps)
    compared = [name for name in ("residual", "static c4", "dynamic c4") if os.path.exists(ckpt(name, 0))]
    if compared and not os.path.exists(os.path.join(out, "diagnose", "diagnostics.json")):
        args = [f"--ckpt={ckpt(name, 0)}" for name in compared] + [f"--label={name}" for name in compared]
        subprocess.run([sys.executable, "diagnose.py", *args, f"--out={os.path.join(out, 'diagnose')}",
                        "--num-samples=128", "--probe-pairs=64"], cwd=ROOT, check=True, capture_output=True)
        log("diagnostics done")
    if tiny:
        return  # the classifier takes minutes to train: the tests check the training and the report
    for name in ("residual", "static c4", "explicit c4", "dynamic c4"):
        for seed in seeds:
            path = os.path.join(run_dir(out, deep, name, seed), "toy_accuracy.txt")
            if os.path.exists(ckpt(name, seed)) and not os.path.exists(path):
                result = subprocess.run([sys.executable, "toy_accuracy.py", f"--ckpt={ckpt(name, seed)}"], cwd=ROOT,
                                        check=True, capture_output=True, text=True).stdout
                with open(path, "w") as f:
                    f.write(result)


def extras(out, tiny):
    """The report's sections on toy accuracy and diagnostics, from what evaluate() left."""
    _, seeds, _ = recipe(tiny)
    deep = max(d for d, _, _, _ in runs(tiny))
    lines, accuracy = [], {}
    for name in ("residual", "static c4", "explicit c4", "dynamic c4"):
        for seed in seeds:
            path = os.path.join(run_dir(out, deep, name, seed), "toy_accuracy.txt")
            if os.path.exists(path):  # toy_accuracy.py's "class accuracy of ...: 0.935" line
                with open(path) as f:
                    line = next(line for line in f if line.startswith("class accuracy"))
                accuracy.setdefault(name, []).append(float(line.rsplit(": ", 1)[1]))
    if accuracy:
        lines += [f"## Toy accuracy of EMA samples, {deep} blocks", "",
                  "Share of 400 samples (guidance 4, 20 Heun steps) that toy_accuracy.py's classifier puts in their "
                  "class, mean ± standard deviation over seeds; p: Welch's t-test against residual routing.", "",
                  "| run | accuracy | p vs residual |", "|---|---|---|"]
        base = accuracy.get("residual", [])
        for name, values in accuracy.items():
            p = welch(values, base) if name != "residual" else "-"
            lines.append(f"| {name} | {mean_std(values)} | {p} |")
        lines.append("")
    if os.path.exists(os.path.join(out, "diagnose", "diagnostics.json")):
        figures = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "diagnose", "*.png")))
        lines += [f"## Diagnostics at {deep} blocks (seed 0; diagnose.py)", ""]
        lines += [f"![{name}](diagnose/{name})" for name in figures] + [""]
    return lines


def mean_std(values):
    if len(values) == 1:
        return f"{values[0]:.4f} (1 seed)"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def report(out, tiny):
    """Write OUT/REPORT.md and its figures from the finished runs; returns the Markdown."""
    common, seeds, steps = recipe(tiny)
    table = losses(out, tiny)
    lines = ["# Study: residual routing vs DAR at the paper's depth", "",
             f"`python tools/study.py` ({len(seeds)} seeds, {steps} steps; recipe: `{' '.join(common)}`).", "",
             f"Held-out velocity loss of the EMA weights ({flag(common, 'eval-samples')} held-out images, 8 fixed t, "
             "fixed noise), mean ± standard deviation over seeds; p: Welch's t-test against residual routing at the "
             "last step.", ""]
    total = 0.0
    for depth in sorted({d for d, _ in table}, reverse=True):
        rows = {name: by_step for (d, name), by_step in table.items() if d == depth}
        steps_seen = sorted({s for by_step in rows.values() for s in by_step})
        lines += [f"## {depth} blocks (L = {2 * depth})", "", "| run | " + " | ".join(f"step {s}" for s in steps_seen)
                  + " | p vs residual (last step) | training time per run (s) |",
                  "|---|" + "---|" * (len(steps_seen) + 2)]
        base = rows.get("residual", {}).get(steps_seen[-1])
        for name, by_step in rows.items():
            last = by_step.get(steps_seen[-1], [])
            p = welch(last, base) if name != "residual" else "-"
            took = [run_seconds(path) for path in (run_dir(out, depth, name, seed) for seed in seeds)
                    if finished(path, steps)]
            total += sum(took)
            lines.append(f"| {name} | " + " | ".join(mean_std(by_step[s]) if s in by_step else "-"
                                                      for s in steps_seen) + f" | {p} | {np.mean(took):.0f} |")
        lines.append("")
    lines += [f"Training time of the finished runs, summed: {total:.0f} s ({total / 3600:.1f} hours; each run's "
              "time from its log's steps/s; `--jobs=2` halves the wall-clock time).", ""]
    lines += sweep_section(out, table, tiny)
    lines += extras(out, tiny)
    text = "\n".join(lines)
    with open(os.path.join(out, "REPORT.md"), "w") as f:
        f.write(text)
    return text


def sweep_section(out, table, tiny):
    """The report's section on the chunk size S: OUT/chunk_sweep.png and a table of where the loss is lowest."""
    from diagnose import line_plot

    steps = recipe(tiny)[2]

    series, rows, sizes = [], [], set()
    for depth in sorted({d for d, _ in table}, reverse=True):
        sweep = chunk_sweep(table, depth, tiny)
        if not sweep:
            continue
        sizes |= set(sweep)
        means = [np.mean(v) for v in sweep.values()]
        series.append((f"{depth} blocks", list(sweep), means, [np.std(v, ddof=1) if len(v) > 1 else 0.0
                                                               for v in sweep.values()]))
        low, high = PREDICTED.get(depth, (None, None))
        if low:
            series.append((f"predicted S*, {depth} blocks", [low, high], [min(means)] * 2))
        best = min(sweep, key=lambda s: np.mean(sweep[s]))
        against_best = lambda s: welch(sweep[s], sweep[best]) if s != best else "-"
        fitted, five, ninety_five, share = optimum(sweep) if len(sweep) >= 3 else (None, None, None, 0.0)
        rows.append(f"| {depth} (L = {2 * depth}) | {best} | {against_best(min(sweep))} | {against_best(max(sweep))} | "
                    + (f"{fitted:.1f}" if fitted else "none") + f" | {share:.0%} | "
                    + (f"{five:.1f}-{ninety_five:.1f}" if five else "-") + " | "
                    + (f"{low:.1f}-{high:.1f} |" if low else "- |"))
    if not series:
        return []
    residual = [(d, by_step[max(by_step)]) for (d, name), by_step in table.items() if name == "residual"]
    line_plot(series, f"static DAR: held-out loss (EMA, step {steps}; mean +- sd over seeds) against S",
              "chunk size S (sublayers)", "loss", os.path.join(out, "chunk_sweep.png"), x_ticks=sorted(sizes),
              hline=(f"residual, {residual[0][0]} blocks", np.mean(residual[0][1])) if residual else None)
    return ["## Chunk size S (static DAR)", "", "![loss against S](chunk_sweep.png)", "",
            "Predicted optimum (Eq. 9, S* grows as sqrt(L)) drawn at each depth's lowest loss, residual routing's "
            "loss dashed. Lowest S: the chunk size with the lowest mean loss at the last step; p: Welch's t-test of "
            "it against the smallest and the largest S; S* fitted: the vertex of a parabola in log S fitted to the seed means (none: the "
            "parabola opens downward or its vertex lies outside the sweep); then the same fit on 2000 bootstrap "
            "resamples of each S's seeds: the share with a minimum inside the sweep, and the 5th-95th percentiles "
            "of where.", "",
            "| blocks | lowest S | p vs smallest S | p vs largest S | S* fitted | resamples with a minimum inside "
            "| their S* (5-95%) | predicted S* |", "|---|---|---|---|---|---|---|---|", *rows, ""]


def publish(out, where):
    """Copy OUT/REPORT.md and the figures it shows into `where`, keeping their relative paths."""
    figures = glob.glob(os.path.join(out, "*.png")) + glob.glob(os.path.join(out, "diagnose", "*.png"))
    for path in [os.path.join(out, "REPORT.md"), *figures]:
        target = os.path.join(where, os.path.relpath(path, out))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(path, target)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", default="results/study28", help="the study's directory (runs, report, figures)")
    p.add_argument("--report-only", action="store_true", help="no training: the report of the runs finished so far")
    p.add_argument("--tiny", action="store_true", help="a seconds-long study for the tests")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, sharing the CPU's cores")
    p.add_argument("--publish", help="copy the report and its figures into this directory (e.g. docs/study28)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if not args.report_only:
        train(args.out, args.tiny, jobs=args.jobs)
        evaluate(args.out, args.tiny)
    print(report(args.out, args.tiny))
    if args.publish:
        publish(args.out, args.publish)


if __name__ == "__main__":
    main()
