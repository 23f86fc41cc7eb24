"""tools/study.py: at a tiny size it trains each run, continues a stopped one where it stopped and reports without
retraining what is done; its statistics (paired bootstrap, steps to reach a loss, the chunk optimum) on data
whose answer is known."""
import json
import os
import re
import shutil

import numpy as np
import pytest

from tools import study


def test_study_resumes_run_by_run_records_and_reports_paired_tables(tmp_path):
    out, record = str(tmp_path / "study"), str(tmp_path / "record")
    messages = []
    jobs = [(run, seed) for run in study.plan(True) for seed in run.seeds]
    assert study.train(out, record, tiny=True, log=messages.append, jobs=2) == len(jobs)
    assert all(m.startswith("main") for m in messages[:6])
    main = {run.name: run for run in study.plan(True) if run.part == "main"}
    kept = sorted(os.listdir(study.run_dir(record, main["static c4"], 0)))
    assert kept == ["args.json", "log.jsonl", "routing.json"]  # no checkpoints in the record
    # Three runs not done: one stopped part-way (its last checkpoint and its record gone, as if killed after step
    # 2), one trained on a machine whose OUT is gone (a new session: its record gone too), one whose evaluation
    # did not end (recorded files but no log).
    part = study.run_dir(out, main["static c4"], 1)
    os.remove(study.last_checkpoint(part, main["static c4"].steps))
    shutil.rmtree(study.run_dir(record, main["static c4"], 1))
    sweep = next(run for run in study.plan(True) if run.part == "sweep")
    shutil.rmtree(study.run_dir(out, sweep, 0))
    shutil.rmtree(study.run_dir(record, sweep, 0))
    os.remove(os.path.join(study.run_dir(record, main["static dense"], 0), "log.jsonl"))
    # And a long run gone from both: it continues the finished main run of its S and seed, from that run's end.
    long = next(run for run in study.plan(True) if run.part == "long" and run.flags[-1] == "--chunk=1")
    seed = long.seeds[0]
    shutil.rmtree(study.run_dir(out, long, seed))
    shutil.rmtree(study.run_dir(record, long, seed))
    residual_log = os.path.join(study.run_dir(record, main["residual"], 0), "log.jsonl")
    before = os.path.getmtime(residual_log)
    assert study.train(out, record, tiny=True, log=messages.append, jobs=2) == 4  # only those four
    continued = [json.loads(line) for line in open(os.path.join(study.run_dir(record, long, seed), "log.jsonl"))]
    assert [r["step"] for r in continued if "resumed" in r] == [main["static dense"].steps]
    for shorter, longer in zip(*(study.curves(record, r, upto=main["static dense"].steps)[1][seed]
                                 for r in (main["static dense"], long))):
        assert shorter == longer  # the same states: a longer run passes through the shorter one's
    assert os.path.getmtime(residual_log) == before
    assert any("resumed" in json.loads(line) for line in open(os.path.join(part, "log.jsonl")))
    assert open(os.path.join(study.run_dir(record, main["static c4"], 1), "log.jsonl")).read() == \
        open(os.path.join(part, "log.jsonl")).read()
    shutil.rmtree(out)  # the report needs the record only
    for seed, (ours, theirs) in enumerate([(0.5, 0.3), (0.6, 0.35)]):  # what toy_accuracy.py prints, made up
        for name, value in (("static c4", ours), ("residual", theirs)):
            with open(os.path.join(study.run_dir(record, main[name], seed), "toy_accuracy_cfg4.txt"), "w") as f:
                f.write(f"class accuracy of 400 samples (guidance 4.0, 20 Heun steps): {value}\n"
                        f"toy FID (the classifier's 128 features, against 400 real shapes): {10 * value}\n")
    study.main(["--out", out, "--record", record, "--tiny", "--report-only", "--publish", str(tmp_path / "published")])
    text = (tmp_path / "published" / "REPORT.md").read_text()
    assert text == (tmp_path / "study" / "REPORT.md").read_text()
    steps, curves = study.curves(record, main["residual"])
    assert steps[-1] == main["residual"].steps and sorted(curves) == [0, 1]
    assert "| residual | 2 | " in text and "| static dense | 2 | " in text and "| 2 (L = 4) | " in text
    assert "| 4 | residual | 2 | 0.325 | +0.000 [+0.000, +0.000] | 3.25 |" in text
    assert "| 4 | static c4 | 2 | 0.550 | +0.225 [+0.200, +0.250] | 5.50 | +2.25 [+2.00, +2.50] |" in text
    distances = json.load(open(os.path.join(study.run_dir(record, main["static c4"], 0), "routing.json")))
    assert sorted(map(int, distances)) == [2, 4] and all(0 <= d["ema"][0] <= 1 for d in distances.values())
    assert "| static c4 | 2 | " in text.split("## How far routing moved from uniform")[1]
    assert "| chunking against dense routing | static c4 - static dense | 2 | " in text  # a paired contrast
    width = text.split("## The width check")[1].split("## Paired comparisons")[0]  # measured against residual w24
    assert "| static c4 w24 | 2 | " in width and "steps to reach residual w24's final loss" in width
    assert "| DAR at width 64 | static c4 w24 - residual w24 | 2 | " in text
    assert "| blocks | seeds | S = 1 | S = 2 | S = 4 |" in text and "\n| 2 | 2 | " in text  # the sweep's means
    assert re.search(r"\n\| 2 \(L = 4\) \|.* \| -?\d+\.\d--?\d+\.\d% \| [124] \|\n", text)  # how flat they are
    longer = text.split("## The sweep at 2 blocks continued to step 6")[1]
    assert "(3 of the 3 runs recorded)" in longer and "Spearman's rank correlation of the two columns: " in longer
    assert sorted(re.findall(r"\n\| (\d) \| \d\.\d{4} \| [\d.]+ \| \d\.\d{4} \| [\d.]+ \|", longer)) == ["1", "2", "4"]
    for figure in ("curves_eval_loss_ema.png", "curves_eval_loss.png", "chunk_sweep.png", "chunk_sweep_long.png"):
        assert (tmp_path / "published" / figure).exists() and f"]({figure})" in text


def test_paired_bootstrap_of_a_known_difference():
    # Five seeds whose runs differ by 0.01 plus a small per-seed noise, on top of a large seed effect that the
    # pairing removes: the interval is narrow around 0.01; unpaired (rows shuffled) it is not.
    rng = np.random.default_rng(0)
    seed_effect = rng.normal(0, 0.05, 5)
    noise = np.array([-0.002, -0.001, 0.0, 0.001, 0.002])
    pair = {"residual": 0.2 + seed_effect, "variant": 0.21 + seed_effect + noise}
    value, low, high, share = study.paired_bootstrap(study.mean_difference, pair, draws=4000)
    assert abs(value - 0.01) < 1e-12 and share == 1.0
    assert 0.0085 < low < 0.01 < high < 0.0115
    shuffled = {"residual": pair["residual"], "variant": pair["variant"][::-1].copy()}
    _, low, high, _ = study.paired_bootstrap(study.mean_difference, shuffled, draws=4000)
    assert high - low > 0.03
    # A statistic that is undefined in some draws reports the share where it is defined: here where two or three
    # of three draws from (0, 1, 1) are ones, 20/27 of them.
    some = study.paired_bootstrap(lambda s: 1.0 if s["x"].sum() > 1 else None, {"x": np.array([0.0, 1.0, 1.0])})
    assert some[0] == 1.0 and abs(some[3] - 20 / 27) < 0.02 and some[1] == some[2] == 1.0


def test_steps_to_reach_interpolates_the_crossing_and_speed_up_is_their_ratio():
    steps = [250, 500, 750, 1000]
    assert study.steps_to_reach(steps, np.array([0.5, 0.4, 0.3, 0.2]), 0.35) == pytest.approx(625.0)
    assert study.steps_to_reach(steps, np.array([0.5, 0.4, 0.3, 0.2]), 0.6) == 250.0
    assert study.steps_to_reach(steps, np.array([0.5, 0.4, 0.3, 0.2]), 0.1) is None
    np.testing.assert_allclose(study.smooth(np.array([4.0, 2.0, 6.0, 0.0]), 2), [4.0, 3.0, 4.0, 3.0])
    # A variant whose curve is the residual's at twice the step count reaches its final loss in half the steps.
    steps = list(range(250, 10_001, 250))
    base = np.array([1.0 / s for s in steps])
    fast = np.array([1.0 / (2 * s) for s in steps])
    ratio = study.speed_up(steps, window=1)({"residual": base[None], "variant": fast[None]})
    assert abs(ratio - 2.0) < 0.01
    assert study.speed_up(steps, window=1)({"residual": fast[None], "variant": base[None]}) is None


def test_chunk_optimum_finds_the_bottom_of_a_u_and_none_in_a_slope():
    rng = np.random.default_rng(0)
    u = {s: list(0.2 + 0.01 * (np.log(s) - np.log(4.0)) ** 2 + 1e-4 * rng.standard_normal(3)) for s in study.SWEEP}
    fitted, low, high, share = study.optimum(u)
    assert abs(fitted - 4.0) < 0.1 and low <= fitted <= high and high - low < 0.5 and share > 0.95
    slope = {s: list(0.2 + 0.01 * np.log(s) + 1e-4 * rng.standard_normal(3)) for s in study.SWEEP}
    assert study.optimum(slope)[::3] == (None, 0.0)
    # A seed effect ten times the U's depth, shared by every S (as the runs share a seed's data): the paired
    # resamples still find the bottom in every draw and place it tightly.
    seeds = np.array([-0.1, 0.0, 0.1])
    shifted = {s: list(np.array(v) + seeds) for s, v in u.items()}
    fitted, low, high, share = study.optimum(shifted)
    assert abs(fitted - 4.0) < 0.1 and high - low < 0.5 and share > 0.95


def test_the_sweep_at_the_main_depth_reads_the_main_runs_of_its_width():
    # At the main part's depth, S = 1 and S = 4 are the main part's static dense and static c4 runs; the width
    # check's static c4 at width 64 (also static, chunk 4, same depth) is another model and must not stand in.
    for tiny in (True, False):
        main_depth = next(r.depth for r in study.plan(tiny) if r.part == "main")
        sweep = study.sweep_runs(tiny, main_depth)
        assert (sweep[1].part, sweep[1].name) == ("main", "static dense")
        assert (sweep[4].part, sweep[4].name) == ("main", "static c4")
        assert all(r.part in ("main", "sweep") and not any(f.startswith("--hidden-size") for f in r.flags)
                   for r in sweep.values())


def test_training_order_gives_every_part_its_first_seeds_then_goes_seed_by_seed():
    jobs = sorted(((run, seed) for run in study.plan() for seed in run.seeds), key=study.order)
    blocks = []  # (part, seeds) of each stretch of consecutive jobs of one part
    for run, seed in jobs:
        if blocks and blocks[-1][0] == run.part:
            blocks[-1][1].add(seed)
        else:
            blocks.append((run.part, {seed}))
    # Sweep seed 1 follows seed 0 at once (no other part has a seed 1 left), and the main part's seeds 3 and 4
    # come last: every part has three seeds before any has more.
    assert blocks == [("main", {0, 1, 2}), ("width", {0, 1}), ("sweep", {0, 1}), ("width", {2}), ("sweep", {2}),
                      ("long", {2}), ("main", {3, 4})]


def test_sqrt_law_fits_c_and_the_exponent():
    c_low, c_high = study.predicted(1)
    fits = {L: 0.5 * L ** 0.5 for L in (8, 16, 32)}
    text = study.sqrt_law(fits)
    assert "c = 0.50" in text and f"predicted {c_low:.2f} to {c_high:.2f}" in text and "L^0.50" in text
    assert "L^1.00" in study.sqrt_law({L: 0.1 * L for L in (8, 32)})
    assert "cannot be fitted" in study.sqrt_law({})


def test_predicted_optimum_is_eq_9_at_both_ends_of_alpha():
    low, high = study.predicted(56)
    assert abs(low - 3.14) < 0.01 and abs(high - 4.90) < 0.01  # not the paper's printed [3.7, 4.9]
    assert abs(study.predicted(224)[0] / low - 2.0) < 1e-12  # sqrt(L): four times the depth, twice the S*


def test_run_seconds_sums_each_log_line_over_its_rate_across_a_resume(tmp_path):
    lines = [dict(step=250, steps_per_s=5.0), dict(step=500, steps_per_s=2.5), dict(step=500, eval_loss=0.3),
             dict(step=500, resumed={}), dict(step=750, steps_per_s=1.0)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert study.run_seconds(str(tmp_path)) == 250 / 5.0 + 250 / 2.5 + 250 / 1.0


def test_routing_distance_is_zero_at_initialisation_and_grows_with_a_query(tmp_path):
    import torch

    from checkpoint import save_checkpoint
    from model import SiT, model_config

    model = SiT(input_size=8, patch_size=4, in_channels=3, hidden_size=16, depth=2, num_heads=2, num_classes=10,
                routing="dynamic", chunk=1)
    state = model.state_dict()
    save_checkpoint({"config": model_config(model), "model": state, "ema": state}, str(tmp_path / "init.pt"))
    assert study.routing_distance(str(tmp_path / "init.pt"), n=8) == (0.0, 0.0)  # zero queries: uniform weights
    for p in model.parameters():
        p.data.add_(0.3 * torch.randn_like(p))
    state = model.state_dict()
    save_checkpoint({"config": model_config(model), "model": state, "ema": state}, str(tmp_path / "moved.pt"))
    uniform, with_t = study.routing_distance(str(tmp_path / "moved.pt"), n=8)
    assert 0.01 < uniform < 1 and 0 < with_t < 1
