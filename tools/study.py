"""
Does DAR converge faster? The paper's convergence claims (8.75x fewer steps to residual SiT's final quality,
a better final quality, the chunk size's U shape and its sqrt(L) law) tested at toy scale on the CPU: narrow
SiTs trained on the toy shapes with one recipe, differing only in routing.

    python tools/study.py --jobs=2          every run not yet recorded, then the report (about 10 h on 2 cores)
    python tools/study.py --report-only     the report from the runs finished so far
    python tools/study.py --report-only --publish=docs/study    and a copy of it and its figures under docs/

Four parts, one recipe (RECIPE):
- main: 8 blocks (L = 16), 10,000 steps, seeds 0-4: residual; residual widened to 52 (426K parameters, the
  nearest width at or above dynamic c4's 405K: the paper's SiT-Plus control); static, explicit and dynamic c4;
  static dense (S = 1); static c4 with the final aggregator reused (Appendix C.3's REPA design).
- width: the same at width 64, seeds 0-2: residual, static and dynamic c4, and residual at 68 (717K parameters,
  dynamic c4's 708K). At width 48 the residual stream is as wide as a token's input (3 x 4 x 4 = 48 numbers) and
  the loss falls steeply with width up to about 52 (residual, 1500 steps: 0.418 at 44, 0.341 at 48, 0.262 at 52,
  0.248 at 56, 0.225 at 64), so the main part's DAR may gain from relieving that bottleneck alone (its final
  aggregator reads the input embedding directly); at 64 it is relieved.
- sweep: static DAR with S in {1, 2, 3, 4, 5, 6, 8} at 4, 8 and 16 blocks, seeds 0-2, 4,000 steps. At 8
  blocks, S = 1 and S = 4 are the main part's runs read at step 4,000: every draw of a run is a function of
  (seed, step) and the learning rate is constant, so a longer run passes through the shorter one's states.
- long: the sweep at 16 blocks continued to 10,000 steps for its last seed, from the sweep run's checkpoint when
  OUT still holds it: whether S ranks at 10,000 steps as it does at 4,000, where the curves still fall.
Every run logs the held-out loss of its raw and of its EMA weights every 250 steps and keeps a checkpoint
every 2,500. As soon as a main run ends: how far its routing moved from uniform at each checkpoint, and how
much it depends on t (routing_distance), and the class accuracy and toy FID (toy_accuracy.py) of its final EMA
samples at guidance 1 and 4.

Two directories. OUT (results/study, not tracked) holds the runs' checkpoints while they train; RECORD
(docs/study/runs, tracked by git) receives each finished run's log and evaluations, a few KB, and the report
is made from RECORD alone. A run whose record exists is done; one stopped part-way continues from its latest
checkpoint in OUT (train.py --resume=latest, bit-exact), or from the start when OUT is gone (a new machine);
one never started starts. So the study continues where it stopped, across sessions, as long as RECORD is
committed.

The statistics are paired: runs of one seed share data order, t, noise and label drops, so each DAR run is
compared with the residual run of its seed, and intervals come from resampling seeds (the same draw for
every variant). It states numbers only: the verdict per claim is written from them, in docs/study.md.
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
from collections import namedtuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, where the scripts are
sys.path.insert(0, ROOT)

from cli import HelpFormatter  # noqa: E402

RECIPE = ["--data=shapes", "--image-size=16", "--model=SiT-S/4", "--hidden-size=48", "--num-heads=4",
          "--global-batch-size=32", "--lr=3e-3", "--ema-decay=0.998", "--log-every=250", "--eval-every=250",
          "--eval-samples=256", "--sample-every=0", "--ckpt-every=2500", "--precision=fp32"]
TINY = ["--data=shapes", "--image-size=8", "--model=SiT-S/4", "--hidden-size=16", "--num-heads=2",
        "--global-batch-size=4", "--lr=3e-3", "--ema-decay=0.9", "--log-every=2", "--eval-every=2",
        "--eval-samples=8", "--sample-every=0", "--ckpt-every=2", "--precision=fp32"]
SWEEP = (1, 2, 3, 4, 5, 6, 8)
ALPHAS = (0.7, 0.4)  # the paper's "realistic range" of alpha in Eq. (8), the ends of S*'s range in that order


def predicted(L):
    """Eq. (9)'s optimum S* = sqrt(L (1 - alpha) / (1 + alpha)) at both ends of alpha's range: [3.14, 4.90] at
    L = 56 (the paper prints [3.7, 4.9], a slip), growing as sqrt(L)."""
    return tuple((L * (1 - a) / (1 + a)) ** 0.5 for a in ALPHAS)

Run = namedtuple("Run", "part depth name flags seeds steps")
EVALUATED = ("main", "width")  # the parts whose runs get sample quality and routing distances


def plan(tiny=False):
    """[Run]: every run of the study in the order it is trained (the main part first, so that an unfinished
    study already answers the headline). tiny: a seconds-long study of the same shape for the tests."""
    if tiny:
        depth, seeds, steps, sweep_depths, sweep_seeds, sweep_steps, sizes = 2, (0, 1), 4, (2,), (0, 1), 2, (1, 2, 4)
        variants = [("residual", ["--routing=residual"]), ("static c4", ["--routing=static", "--chunk=4"]),
                    ("static dense", ["--routing=static", "--chunk=1"])]
        wide = [("residual w24", ["--routing=residual", "--hidden-size=24"]),
                ("static c4 w24", ["--routing=static", "--chunk=4", "--hidden-size=24"])]
    else:
        depth, seeds, steps, sweep_depths, sweep_seeds, sweep_steps, sizes = 8, range(5), 10_000, (4, 8, 16), \
            range(3), 4_000, SWEEP
        variants = [("residual", ["--routing=residual"]), ("residual wide", ["--routing=residual", "--hidden-size=52"]),
                    ("static c4", ["--routing=static", "--chunk=4"]),
                    ("explicit c4", ["--routing=explicit", "--chunk=4"]),
                    ("dynamic c4", ["--routing=dynamic", "--chunk=4"]),
                    ("static dense", ["--routing=static", "--chunk=1"]),
                    ("static c4 reuse", ["--routing=static", "--chunk=4", "--final-agg=reuse"])]
        wide = [("residual w64", ["--routing=residual", "--hidden-size=64"]),
                ("static c4 w64", ["--routing=static", "--chunk=4", "--hidden-size=64"]),
                ("dynamic c4 w64", ["--routing=dynamic", "--chunk=4", "--hidden-size=64"]),
                ("residual w68", ["--routing=residual", "--hidden-size=68"])]
    runs = [Run("main", depth, name, flags, tuple(seeds), steps) for name, flags in variants]
    runs += [Run("width", depth, name, flags, tuple(seeds)[:3], steps) for name, flags in wide]
    for d in sweep_depths:
        runs += [Run("sweep", d, f"static S={s}", ["--routing=static", f"--chunk={s}"], tuple(sweep_seeds),
                     sweep_steps) for s in sizes if not (d == depth and s in (1, 4))]  # those are main runs
    runs += [Run("long", sweep_depths[-1], f"static S={s} long", ["--routing=static", f"--chunk={s}"],
                 tuple(sweep_seeds)[-1:], steps + 2 if tiny else steps) for s in sizes]  # tiny: past the main runs
    return runs


def sweep_runs(tiny, depth):
    """{S: Run} of static DAR at this depth, the main part's dense and c4 runs included where they serve (not
    the width check's: another width is another model)."""
    out = {}
    for run in plan(tiny):
        if run.part in ("main", "sweep") and run.depth == depth and "--routing=static" in run.flags \
                and "--final-agg=reuse" not in run.flags:
            out[chunk(run)] = run
    return dict(sorted(out.items()))


def chunk(run):
    """The run's --chunk (None for residual routing)."""
    return next((int(f.split("=")[1]) for f in run.flags if f.startswith("--chunk=")), None)


def run_dir(root, run, seed):
    """Where one run lives, under OUT (checkpoints) and under RECORD (its log and evaluations) alike."""
    return os.path.join(root, f"depth{run.depth}", f"{run.name.replace(' ', '_').replace('=', '')}-s{seed}")


def last_checkpoint(path, steps):
    return os.path.join(path, "checkpoints", f"{steps:07d}.pt")


def finished(path, steps):
    """Whether the run in `path` (under OUT) holds its last checkpoint."""
    return os.path.exists(last_checkpoint(path, steps))


def recorded(record, run, seed):
    """Whether the run is done: its log is in RECORD (copied last, after its evaluations)."""
    return os.path.exists(os.path.join(run_dir(record, run, seed), "log.jsonl"))


def keep(path, target):
    """Copy a finished run's small files (not its checkpoints) from OUT to RECORD, the log last and each file
    through a rename, so that a record with a log is a whole one."""
    os.makedirs(target, exist_ok=True)
    names = sorted(n for n in os.listdir(path) if n.endswith((".json", ".txt")))  # not curves.png: the report draws
    for name in [*names, "log.jsonl"]:
        shutil.copyfile(os.path.join(path, name), os.path.join(target, name + ".tmp"))
        os.replace(os.path.join(target, name + ".tmp"), os.path.join(target, name))


def order(job):
    """The training order: the main part's first three seeds, two of the width check and one of every sweep
    point; then the rest seed by seed, the width check before the sweep within a seed (it costs a third as
    much) and the long part after it (it continues the sweep's runs), so that a study stopped part-way has a
    rough answer to every claim."""
    run, seed = job
    first = seed < {"main": 3, "width": 2, "sweep": 1, "long": 0}[run.part]
    return (not first, 0 if first else seed, ("main", "width", "sweep", "long").index(run.part), seed)


def train(out, record, tiny, log=print, jobs=1):
    """Every run not yet recorded, `jobs` at a time (each with its share of the CPU's threads: these narrow
    models run faster as two one-thread processes than as one two-thread one), each evaluated and recorded as
    soon as it ends; returns how many were trained (or continued) now."""
    common = TINY if tiny else RECIPE
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    pending = sorted(((run, seed) for run in plan(tiny) for seed in run.seeds if not recorded(record, run, seed)),
                     key=order)
    if not tiny and any(run.part in EVALUATED for run, _ in pending):
        from toy_accuracy import load_classifier
        load_classifier(16, CLASSIFIER)  # trained once, here, before the runs that share it

    def one(run, seed):
        path = run_dir(out, run, seed)
        start = time.time()
        if not finished(path, run.steps):
            if run.part == "long" and not os.path.isdir(path):
                shorter = sweep_runs(tiny, run.depth)[chunk(run)]
                if finished(run_dir(out, shorter, seed), shorter.steps):  # continue it: the same states, fewer steps
                    shutil.rmtree(path + ".partial", ignore_errors=True)  # a copy stopped half-way
                    shutil.copytree(run_dir(out, shorter, seed), path + ".partial")
                    os.replace(path + ".partial", path)
            resume = ["--resume=latest"] if glob.glob(os.path.join(path, "checkpoints", "*.pt")) else []
            if not resume and os.path.isdir(path):
                shutil.rmtree(path)  # a run stopped before its first checkpoint: start it again
            subprocess.run([sys.executable, "train.py", *common, f"--depth={run.depth}", *run.flags,
                            f"--seed={seed}", f"--max-steps={run.steps}", f"--results-dir={path}", *resume], cwd=ROOT,
                           check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": threads})
        if run.part in EVALUATED:
            evaluate(path, run, tiny, threads)
        keep(path, run_dir(record, run, seed))
        log(f"{run.part} depth {run.depth} {run.name} seed {seed}: {time.time() - start:.0f} s")

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(one, *job) for job in pending]
        try:
            for done in concurrent.futures.as_completed(futures):
                done.result()
        except BaseException:  # a failed run stops the study with its error; the runs under way finish first
            pool.shutdown(cancel_futures=True)
            raise
    return len(pending)


def curves(record, run, key="eval_loss_ema", upto=None):
    """(steps, {seed: losses at those steps}) of the run's seeds whose logs reach `upto` (default: its last
    step), each cut at `upto`; key: "eval_loss_ema" or "eval_loss" (the raw weights)."""
    upto = upto or run.steps
    by_seed = {}
    for seed in run.seeds:
        path = os.path.join(run_dir(record, run, seed), "log.jsonl")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            points = {r["step"]: r[key] for r in map(json.loads, f) if key in r and r["step"] <= upto}
        if upto in points:
            by_seed[seed] = points
    if not by_seed:
        return [], {}
    steps = sorted(set.intersection(*(set(p) for p in by_seed.values())))
    return steps, {seed: np.array([p[s] for s in steps]) for seed, p in by_seed.items()}


def smooth(curve, window):
    """The running mean over the last `window` points (fewer at the start): single evaluations are noisy."""
    c = np.cumsum(np.concatenate([[0.0], curve]))
    i = np.arange(1, len(curve) + 1)
    return (c[i] - c[np.maximum(i - window, 0)]) / np.minimum(i, window)


def steps_to_reach(steps, curve, target):
    """The first step at which `curve` (sampled at `steps`) is at or below `target`, linearly interpolated
    between the evaluations around the crossing; None if it never is."""
    below = np.nonzero(np.asarray(curve) <= target)[0]
    if not len(below):
        return None
    i = below[0]
    if i == 0:
        return float(steps[0])
    (s0, s1), (c0, c1) = steps[i - 1:i + 1], curve[i - 1:i + 1]
    return float(s0 + (s1 - s0) * (c0 - target) / (c0 - c1))


def last_quarter(steps):
    """The index of the last evaluation at or before three quarters of the way to the last step (0 if none): where
    "how much a curve still fell over its last quarter" starts."""
    return max([i for i, step in enumerate(steps) if step <= 0.75 * steps[-1]] or [0])


def paired_bootstrap(statistic, samples, draws=10_000, seed=0, level=0.95):
    """statistic(resampled) over bootstrap resamples of the seeds, paired: samples maps a name to an array
    (seeds, ...) whose rows are the same seeds in the same order for every name, and each draw takes the same
    rows from all of them. Returns (value on the samples, low, high, share of draws where the statistic is
    defined); low/high: the percentile interval at `level` of the defined draws (None when none is)."""
    n = len(next(iter(samples.values())))
    rng = np.random.default_rng(seed)
    value = statistic(samples)
    drawn = []
    for _ in range(draws):
        rows = rng.integers(n, size=n)
        drawn.append(statistic({name: a[rows] for name, a in samples.items()}))
    defined = [v for v in drawn if v is not None]
    if not defined:
        return value, None, None, 0.0
    low, high = np.percentile(defined, [50 * (1 - level), 50 * (1 + level)])
    return value, float(low), float(high), len(defined) / draws


def speed_up(steps, window):
    """The headline statistic on {"residual": (seeds, points), "variant": ...}: residual's steps to reach its
    own final smoothed loss over the variant's steps to reach it, on the seed-mean curves; None if the
    variant never reaches it."""
    def statistic(samples):
        base, other = (smooth(samples[k].mean(0), window) for k in ("residual", "variant"))
        theirs = steps_to_reach(steps, other, base[-1])
        return steps_to_reach(steps, base, base[-1]) / theirs if theirs else None
    return statistic


def mean_difference(samples):
    """The seed-mean of variant - residual at one step (samples: {"residual": (seeds,), "variant": (seeds,)})."""
    return float(np.mean(samples["variant"] - samples["residual"]))


def optimum(sweep, draws=2000, seed=0):
    """Where the loss is lowest in S, from a parabola in log S fitted to the seed means (Eq. 9's cost adds a term
    that falls with S to one that grows with it; a parabola in log S is the simplest U). sweep: {S: losses of
    the same seeds in the same order}. Returns (S* of the fit, None when it opens downward or its vertex lies
    outside the sweep; the 5th and 95th percentiles of S* over bootstrap resamples of the seeds, None when no
    resample has a minimum inside; the share of resamples that do). The resamples are paired, as the runs are:
    each draws the same seeds at every S, so a seed that is hard at every S moves no vertex."""
    sizes = sorted(sweep)
    x = np.log(sizes)

    def vertex(means):
        a, b, _ = np.polyfit(x, means, 2)
        return float(np.exp(-b / (2 * a))) if a > 0 and x[0] <= -b / (2 * a) <= x[-1] else None

    rng = np.random.default_rng(seed)
    fitted = vertex([np.mean(sweep[s]) for s in sizes])
    table = np.array([sweep[s] for s in sizes])  # (S, seeds)
    resampled = [vertex(table[:, rng.integers(table.shape[1], size=table.shape[1])].mean(1)) for _ in range(draws)]
    inside = [v for v in resampled if v is not None]
    low, high = map(float, np.percentile(inside, [5, 95])) if inside else (None, None)
    return fitted, low, high, len(inside) / draws


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


def interval(value, low, high, share, fmt="{:.2f}"):
    if value is None:
        return "not reached"
    text = fmt.format(value) + (f" [{fmt.format(low)}, {fmt.format(high)}]" if low is not None else "")
    return text + (f" ({share:.0%} of draws reach it)" if share < 1 else "")


def main_section(record, out, tiny, window, part="main"):
    """The headline tables (steps to reach residual's final loss; paired differences at fixed steps) and the
    loss curves with seed bands, from the finished runs of the main part (or of the width check: part="width",
    whose first run, residual at width 64, is the one the others are measured against)."""
    from diagnose import line_plot

    main = [r for r in plan(tiny) if r.part == part]
    base = main[0]
    lines = []
    for key, weights in (("eval_loss_ema", "EMA"), ("eval_loss", "raw")):
        steps, residual = curves(record, base, key)
        if not residual:
            return [f"The {part} part has no finished {base.name} run yet.", ""]
        series, rows, diffs = [], [], []
        checkpoints = [s for s in (1000, 2500, 5000, base.steps) if s in steps]
        shown = [i for i, s in enumerate(steps) if s >= base.steps // 10]  # the first tenth falls too steeply to see
        quarter = last_quarter(steps)
        for run in main:
            _, theirs = curves(record, run, key)
            seeds = sorted(set(theirs) & set(residual))
            if not seeds:
                continue
            a = np.stack([theirs[s] for s in seeds])
            spread = a.std(0, ddof=1) if len(seeds) > 1 else 0 * a[0]
            series.append((run.name, [steps[i] for i in shown], list(a.mean(0)[shown]), list(spread[shown])))
            pair = {"residual": np.stack([residual[s] for s in seeds]), "variant": a}
            mine = smooth(a.mean(0), window)
            reach = steps_to_reach(steps, mine, smooth(pair["residual"].mean(0), window)[-1])
            ratio = paired_bootstrap(speed_up(steps, window), pair, draws=2000)
            rows.append(f"| {run.name} | {len(seeds)} | " + (f"{reach:.0f}" if reach else "not reached")
                        + f" | {interval(*ratio)} | {mine[-1]:.4f} | {100 * (1 - mine[-1] / mine[quarter]):.1f}% |")
            diffs.append(f"| {run.name} | " + " | ".join(
                interval(*paired_bootstrap(mean_difference, {k: v[:, steps.index(s)] for k, v in pair.items()},
                                           draws=2000), fmt="{:+.4f}") for s in checkpoints) + " |")
        figure = f"curves_{key}.png" if part == "main" else f"curves_{part}_{key}.png"
        line_plot(series,
                  f"held-out loss ({weights} weights) at {base.depth} blocks; bars: +-1 sd over seeds", "step",
                  "loss", os.path.join(out, figure))
        lines += [f"## {weights} weights: steps to reach {base.name}'s final loss ({base.depth} blocks)", "",
                  f"![curves]({figure})", "",
                  f"Target: {base.name}'s held-out loss at step {base.steps}, the seed mean smoothed over the last "
                  f"{window} evaluations. Steps: when the variant's smoothed seed-mean curve first reaches it. "
                  f"Speed-up: {base.name}'s steps over the variant's, with a paired bootstrap 95% interval over seeds. "
                  f"Final: the smoothed seed-mean loss at step {base.steps}; last quarter: how much it fell from "
                  f"step {steps[quarter]} to {base.steps}, which says how flat each curve is at the end. The figure "
                  f"starts at step {steps[shown[0]]}.",
                  "", "| run | seeds | steps to reach | speed-up [95%] | final | fall in the last quarter |",
                  "|---|---|---|---|---|---|", *rows, "",
                  f"Paired difference variant - {base.name} of the held-out loss ({weights}), seed mean [95% bootstrap]:",
                  "", "| run | " + " | ".join(f"step {s}" for s in checkpoints) + " |",
                  "|---|" + "---|" * len(checkpoints), *diffs, ""]
    return lines


def sweep_section(record, out, tiny):
    """Loss against S at every depth (OUT/chunk_sweep.png) and where it is lowest, against Eq. 9's optimum."""
    from diagnose import line_plot

    allowed, upto = next((r.seeds, r.steps) for r in plan(tiny) if r.part == "sweep")  # main runs read at `upto`
    depths = sorted({r.depth for r in plan(tiny)})
    columns = sorted({s for depth in depths for s in sweep_runs(tiny, depth)})
    series, rows, means, sizes, fits = [], [], [], set(), {}
    for depth in depths:
        found, earlier, falls = {}, {}, []
        for s, run in sweep_runs(tiny, depth).items():
            steps, by_seed = curves(record, run, upto=upto)
            by_seed = {seed: c for seed, c in by_seed.items() if seed in allowed}
            if by_seed:
                quarter = last_quarter(steps)
                found[s] = {seed: c[-1] for seed, c in by_seed.items()}
                earlier[s] = {seed: c[quarter] for seed, c in by_seed.items()}
                ends = np.array([[c[quarter], c[-1]] for c in by_seed.values()]).mean(0)
                falls.append(1 - ends[1] / ends[0])
        if not found:
            continue
        common = sorted(set.intersection(*(set(v) for v in found.values())))  # paired: seeds every S has
        paired = lambda by_s: {s: [v[seed] for seed in common] if common else list(v.values()) for s, v in by_s.items()}
        sweep, before = paired(found), paired(earlier)
        sizes |= set(sweep)
        means.append(f"| {depth} | {len(common) or 'unpaired'} | "
                     + " | ".join(f"{np.mean(sweep[s]):.4f}" if s in sweep else "-" for s in columns) + " |")
        series.append((f"{depth} blocks", list(sweep), [np.mean(v) for v in sweep.values()],
                       [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in sweep.values()]))
        low, high = predicted(2 * depth)
        best, best_before = (min(losses, key=lambda s: np.mean(losses[s])) for losses in (sweep, before))
        fitted, five, ninety_five, share = optimum(sweep) if len(sweep) >= 3 else (None, None, None, 0.0)
        if fitted:
            fits[2 * depth] = fitted
        rows.append(f"| {depth} (L = {2 * depth}) | {best} | " + (f"{fitted:.1f}" if fitted else "none")
                    + f" | {share:.0%} | " + (f"{five:.1f}-{ninety_five:.1f}" if five else "-")
                    + f" | {low:.2f}-{high:.2f} | {100 * min(falls):.1f}-{100 * max(falls):.1f}% | {best_before} |")
    if not series:
        return []
    line_plot(series, "static DAR: held-out loss (EMA; mean +- sd over seeds) against S", "chunk size S (sublayers)",
              "loss", os.path.join(out, "chunk_sweep.png"), x_ticks=sorted(sizes))
    return ["## Chunk size S (static DAR)", "", "![loss against S](chunk_sweep.png)", "",
            f"Held-out loss (EMA) at step {upto}, seed mean over the seeds that every S at that depth has "
            "('unpaired': none is common yet, each S's own seeds):", "",
            "| blocks | seeds | " + " | ".join(f"S = {s}" for s in columns) + " |", "|---|---|" + "---|" * len(columns),
            *means, "",
            "Lowest S: the chunk size with the lowest seed-mean loss; S* fitted: the vertex of a parabola in log S "
            "fitted to the seed means (none: it opens downward or its vertex lies outside the sweep); then the same "
            "fit on 2000 paired bootstrap resamples of the seeds: the share with a minimum inside the sweep and the "
            "5th-95th percentiles of where. Predicted: Eq. 9 with alpha in [0.4, 0.7]. Last quarter: how much the "
            f"seed-mean loss fell over the last quarter of the {upto} steps, lowest and highest over S (how flat the "
            "curves are where they are compared); and the lowest S at the start of that quarter (whether the ranking "
            "still moves while they fall).", "",
            "| blocks | lowest S | S* fitted | resamples with a minimum inside | their S* (5-95%) | predicted S* "
            "| fall in the last quarter | lowest S a quarter earlier |", "|---|---|---|---|---|---|---|---|", *rows, "",
            sqrt_law(fits), ""]


def long_section(record, out, tiny):
    """The long part: loss against S at the sweep's last step and at the long runs' last step, ranked, with the
    rank correlation of the two (OUT/chunk_sweep_long.png)."""
    from diagnose import line_plot
    from scipy.stats import rankdata, spearmanr

    upto = next(r.steps for r in plan(tiny) if r.part == "sweep")
    runs, found = [r for r in plan(tiny) if r.part == "long"], {}
    for run in runs:
        steps, by_seed = curves(record, run)
        if by_seed:
            mean = np.mean(list(by_seed.values()), axis=0)  # over seeds, at every evaluation
            found[chunk(run)] = (mean[steps.index(upto)], mean[-1], 1 - mean[-1] / mean[last_quarter(steps)])
    if not found:
        return []
    sizes, (early, final, falls) = list(found), map(np.array, zip(*found.values()))
    run = runs[0]
    line_plot([(f"step {upto}", sizes, early), (f"step {run.steps}", sizes, final)],
              f"static DAR at {run.depth} blocks, seed {', '.join(map(str, run.seeds))}: held-out loss (EMA) "
              "against S", "chunk size S (sublayers)", "loss", os.path.join(out, "chunk_sweep_long.png"), x_ticks=sizes)
    rows = [f"| {s} | {a:.4f} | {ra:g} | {b:.4f} | {rb:g} | {100 * f:.1f}% |"
            for s, a, ra, b, rb, f in zip(sizes, early, rankdata(early), final, rankdata(final), falls)]
    constant = len(set(early)) == 1 or len(set(final)) == 1
    rho = "undefined (under 3 sizes or a column with one value)" if len(sizes) < 3 or constant else \
        f"{spearmanr(early, final)[0]:+.2f}"
    return [f"## The sweep at {run.depth} blocks continued to step {run.steps}", "",
            "![loss against S, early and late](chunk_sweep_long.png)", "",
            f"Seed {', '.join(map(str, run.seeds))} ({len(sizes)} of the {len(runs)} runs recorded); "
            f"held-out loss (EMA) at the sweep's step {upto} and at step {run.steps}, each ranked over S (1: lowest); "
            f"last quarter: how much it fell over the last quarter of the {run.steps} steps.", "",
            f"| S | loss at {upto} | rank | loss at {run.steps} | rank | fall in the last quarter |",
            "|---|---|---|---|---|---|", *rows, "",
            f"Lowest S: {sizes[int(np.argmin(early))]} at step {upto}, {sizes[int(np.argmin(final))]} at step "
            f"{run.steps}; Spearman's rank correlation of the two columns: {rho}.", ""]


def sqrt_law(fits):
    """The fitted optima {L: S*} against Eq. 9's S* = c sqrt(L), c = sqrt((1 - alpha) / (1 + alpha))."""
    c_low, c_high = predicted(1)
    if not fits:
        return (f"Eq. 9's law S* = c sqrt(L) (c in [{c_low:.2f}, {c_high:.2f}]) cannot be fitted: no depth has a "
                "minimum inside the sweep.")
    L, S = np.array(sorted(fits), dtype=float), np.array([fits[k] for k in sorted(fits)])
    c = float(np.sum(S * np.sqrt(L)) / np.sum(L))  # least squares of S* = c sqrt(L)
    text = (f"Eq. 9's law S* = c sqrt(L), fitted to the {len(L)} depth(s) with a minimum inside: c = {c:.2f} "
            f"(predicted {c_low:.2f} to {c_high:.2f})")
    if len(L) >= 2:
        text += f"; with a free exponent, S* grows as L^{np.polyfit(np.log(L), np.log(S), 1)[0]:.2f} (sqrt: L^0.5)"
    return text + "."


#################################################################################
#          After training: sample quality, and how far routing moved            #
#################################################################################

GUIDANCE = (1.0, 4.0)
CLASSIFIER = os.path.join(ROOT, "results", "shapes_classifier_16px.pt")  # toy_accuracy.py's, for 16px shapes


def routing_distance(ckpt, ema=True, ts=(0.1, 0.5, 0.9), n=64):
    """(how far the routing weights are from uniform, how much they change with t) of a DAR checkpoint: the total
    variation distance 0.5 sum_i |alpha_i - 1/|S_l||, and 0.5 sum_i |alpha_i(t=0.1) - alpha_i(t=0.9)|, each
    averaged over aggregators with more than one source, tokens and n held-out images (fixed noise) and, for the
    first, over t. Both are 0 at initialisation (every query starts at zero). Static DAR's weights depend on t
    too, though its queries do not: the keys are the normalised sources, which depend on the input x_t."""
    import torch

    from checkpoint import load_model
    from data import Shapes
    from diagnose import batch_at

    model = load_model(ckpt, ema=ema).eval()
    data = Shapes(size=model.config.input_size, seed=0, num_eval=n)
    alphas = []
    for t in ts:
        xt, _, y = batch_at(data, data.eval, t, 0, "cpu")
        with torch.no_grad():
            alphas.append(model(xt, torch.full((n,), t), y, return_weights=True)[1]["alpha"])
    many = [l for l, a in enumerate(alphas[0]) if a.shape[-1] > 1]
    uniform = np.mean([0.5 * (a[l] - 1 / a[l].shape[-1]).abs().sum(-1).mean().item() for a in alphas for l in many])
    with_t = np.mean([0.5 * (alphas[0][l] - alphas[-1][l]).abs().sum(-1).mean().item() for l in many])
    return float(uniform), float(with_t)


def evaluate(path, run, tiny, threads="1"):
    """One finished main run in `path`: the routing distances of every kept checkpoint (DAR; routing.json) and,
    unless tiny (the classifier takes minutes to train), toy_accuracy.py's class accuracy and toy FID of the
    final EMA samples at guidance 1 and 4 (toy_accuracy_cfg<g>.txt). Each result is a file, skipped when it
    exists."""
    if "--routing=residual" not in run.flags and not os.path.exists(os.path.join(path, "routing.json")):
        distances = {}
        for ckpt in sorted(glob.glob(os.path.join(path, "checkpoints", "*.pt"))):
            step = int(os.path.basename(ckpt)[:-3])
            distances[step] = {"ema": routing_distance(ckpt), "raw": routing_distance(ckpt, ema=False)}
        with open(os.path.join(path, "routing.json"), "w") as f:
            json.dump(distances, f)
    for g in () if tiny else GUIDANCE:
        file = os.path.join(path, f"toy_accuracy_cfg{g:g}.txt")
        if not os.path.exists(file):
            said = subprocess.run([sys.executable, "toy_accuracy.py", f"--ckpt={last_checkpoint(path, run.steps)}",
                                   f"--cfg-scale={g}", f"--classifier={CLASSIFIER}"], cwd=ROOT, check=True,
                                  capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": threads})
            with open(file, "w") as f:
                f.write(said.stdout)


def quality(path, g):
    """(class accuracy, toy FID) from a run's toy_accuracy_cfg<g>.txt, or None."""
    file = os.path.join(path, f"toy_accuracy_cfg{g:g}.txt")
    if not os.path.exists(file):
        return None
    with open(file) as f:
        lines = f.read().splitlines()
    value = lambda prefix: float(next(line for line in lines if line.startswith(prefix)).rsplit(": ", 1)[1])
    return value("class accuracy"), value("toy FID")


def scores(record, run, g, i):
    """{seed: class accuracy (i = 0) or toy FID (i = 1)} of a main run's seeds evaluated at guidance g."""
    found = {s: quality(run_dir(record, run, s), g) for s in run.seeds}
    return {s: q[i] for s, q in found.items() if q}


def final_losses(record, run, key):
    """{seed: held-out loss at the run's last step} of its finished seeds; key as in curves()."""
    return {seed: float(c[-1]) for seed, c in curves(record, run, key)[1].items()}


def difference(mine, theirs, fmt):
    """(the seeds both have, their paired difference mine - theirs as 'mean [95% bootstrap]') of two {seed: value}."""
    seeds = sorted(set(mine) & set(theirs))
    if not seeds:
        return seeds, "-"
    pair = {"residual": np.array([theirs[s] for s in seeds]), "variant": np.array([mine[s] for s in seeds])}
    return seeds, interval(*paired_bootstrap(mean_difference, pair, draws=2000), fmt=fmt)


# The comparisons behind the paper's other claims, each a paired difference A - B by seed.
CONTRASTS = [("timestep-aware queries (Table 2)", "explicit c4", "static c4"),
             ("timestep-aware queries (Table 2)", "dynamic c4", "static c4"),
             ("timestep-aware queries (Table 2)", "dynamic c4", "explicit c4"),
             ("the dedicated final aggregator (Appendix C.3)", "static c4", "static c4 reuse"),
             ("DAR against a residual SiT of its parameters (SiT-Plus)", "dynamic c4", "residual wide"),
             ("DAR against a residual SiT of its parameters (SiT-Plus)", "dynamic c4 w64", "residual w68"),
             ("DAR at width 64", "static c4 w64", "residual w64"),
             ("DAR at width 64", "dynamic c4 w64", "residual w64"),
             ("chunking against dense routing", "static c4", "static dense"),
             ("DAR at width 64", "static c4 w24", "residual w24")]  # the tiny study's


def contrast_section(record, tiny):
    """CONTRASTS at the main part's last step: held-out loss (EMA and raw) and the guided samples' quality."""
    main = {r.name: r for r in plan(tiny) if r.part in EVALUATED}
    rows = []
    for claim, a, b in CONTRASTS:
        if a not in main or b not in main:
            continue
        cells = [difference(final_losses(record, main[a], key), final_losses(record, main[b], key), "{:+.4f}")
                 for key in ("eval_loss_ema", "eval_loss")]
        cells += [difference(scores(record, main[a], GUIDANCE[-1], i), scores(record, main[b], GUIDANCE[-1], i), fmt)
                  for i, fmt in ((0, "{:+.3f}"), (1, "{:+.2f}"))]
        if cells[0][0]:
            rows.append(f"| {claim} | {a} - {b} | {len(cells[0][0])} | " + " | ".join(c[1] for c in cells) + " |")
    if not rows:
        return []
    last = next(iter(main.values())).steps
    return [f"## Paired comparisons at step {last}", "",
            "Each row: A - B, paired by seed, seed mean [95% bootstrap]; loss: held-out loss at the last step "
            f"(not smoothed); accuracy and toy FID at guidance {GUIDANCE[-1]:g}.", "",
            "| claim | A - B | seeds | loss (EMA) | loss (raw) | accuracy | toy FID |", "|---|---|---|---|---|---|---|",
            *rows, ""]


def quality_section(record, tiny):
    """Accuracy and toy FID of the final EMA samples per variant and guidance, with the paired difference to
    residual routing of the same width (the first run of its part); and the routing distances by step."""
    main = [r for r in plan(tiny) if r.part in EVALUATED]
    rows = []
    for g in GUIDANCE:
        for run in main:
            base = next(r for r in main if r.part == run.part)
            cells = []
            for i, fmt in ((0, "{:+.3f}"), (1, "{:+.2f}")):
                mine = scores(record, run, g, i)
                seeds, text = difference(mine, scores(record, base, g, i), fmt)
                if not seeds:
                    break
                value = np.mean([mine[s] for s in seeds])
                cells += [f"{value:.3f}" if i == 0 else f"{value:.2f}", text]
            else:
                rows.append(f"| {g:g} | {run.name} | {len(seeds)} | " + " | ".join(cells) + " |")
    lines = []
    if rows:
        lines += ["## Sample quality (final EMA weights; toy_accuracy.py, 400 samples, 20 Heun steps)", "",
                  "Accuracy: share of samples the shape classifier puts in their class. Toy FID: Frechet distance "
                  "of the classifier's 128 features of the samples and of 400 real shapes. Differences: variant - "
                  "residual of its width (residual, or residual w64 in the width check), paired by seed, seed mean "
                  "[95% bootstrap].", "",
                  "| guidance | run | seeds | accuracy | - residual | toy FID | - residual |",
                  "|---|---|---|---|---|---|---|", *rows, ""]
    table = []
    for run in main:
        found = [json.load(open(p)) for p in (os.path.join(run_dir(record, run, s), "routing.json") for s in run.seeds)
                 if os.path.exists(p)]
        if not found:
            continue
        steps = sorted(found[0], key=int)
        cell = lambda step, which, i: np.mean([d[step][which][i] for d in found if step in d])
        pair = lambda step, i: f"{cell(step, 'ema', i):.3f} ({cell(step, 'raw', i):.3f})"
        table.append(f"| {run.name} | {len(found)} | " + " | ".join(pair(s, 0) for s in steps)
                     + f" | {pair(steps[-1], 1)} |")
    if table:
        lines += ["## How far routing moved from uniform", "",
                  "Total variation distance of the routing weights from uniform, averaged over aggregators with more "
                  "than one source, tokens, 64 held-out images and t in {0.1, 0.5, 0.9}; EMA weights (raw in "
                  "brackets), seed mean; 0 at step 0. Last column: the distance between the weights at t = 0.1 "
                  "and t = 0.9 at the last step (static DAR's too: its query is fixed, but its keys, the "
                  "normalised sources, depend on x_t).", "",
                  "| run | seeds | " + " | ".join(f"step {s}" for s in steps) + " | t = 0.1 vs 0.9 |",
                  "|---|---|" + "---|" * (len(steps) + 1), *table, ""]
    return lines


def report(record, out, tiny, window=4):
    """Write OUT/REPORT.md and its figures from the runs in RECORD; returns the Markdown."""
    lines = ["# Study: does DAR converge faster? (toy scale)", "",
             f"`python tools/study.py` (recipe: `{' '.join(TINY if tiny else RECIPE)}`; held-out velocity loss on "
             "fixed images, t and noise).", ""]
    lines += main_section(record, out, tiny, window)
    lines += ["## The width check: the same at width 64, past the token's 48 numbers", ""]
    lines += main_section(record, out, tiny, window, part="width")
    lines += contrast_section(record, tiny)
    lines += quality_section(record, tiny)
    lines += sweep_section(record, out, tiny)
    lines += long_section(record, out, tiny)
    took = [run_seconds(run_dir(record, run, seed)) for run in plan(tiny) for seed in run.seeds
            if recorded(record, run, seed)]
    lines += [f"Training time of the {len(took)} finished runs, summed: {sum(took):.0f} s ({sum(took) / 3600:.1f} "
              "hours; from the logs' steps/s; `--jobs=2` halves the wall-clock time).", ""]
    text = "\n".join(lines)
    with open(os.path.join(out, "REPORT.md"), "w") as f:
        f.write(text)
    return text


def publish(out, where):
    """Copy OUT/REPORT.md and the figures it shows into `where`, keeping their relative paths."""
    for path in [os.path.join(out, "REPORT.md"), *glob.glob(os.path.join(out, "*.png"))]:
        target = os.path.join(where, os.path.relpath(path, out))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(path, target)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", default="results/study", help="the runs' checkpoints while they train, the report")
    p.add_argument("--record", default="docs/study/runs",
                   help="each finished run's log and evaluations (commit it: the study continues from it)")
    p.add_argument("--report-only", action="store_true", help="no training: the report of the runs finished so far")
    p.add_argument("--tiny", action="store_true", help="a seconds-long study for the tests")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, sharing the CPU's cores")
    p.add_argument("--publish", help="copy the report and its figures into this directory (e.g. docs/study)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if not args.report_only:
        train(args.out, args.record, args.tiny, jobs=args.jobs)
    print(report(args.record, args.out, args.tiny))
    if args.publish:
        publish(args.out, args.publish)


if __name__ == "__main__":
    main()
