"""study.py at a tiny size: it trains each run, continues a stopped one where it stopped, aggregates seeds and
writes its report, without retraining what is done."""
import json
import os
import shutil

import numpy as np

from tools import study


def test_study_resumes_run_by_run_and_reports_mean_and_spread_over_seeds(tmp_path):
    out = str(tmp_path / "study")
    messages = []
    assert study.train(out, tiny=True, log=messages.append, jobs=2) == 2 * len(study.runs(True))
    # Stop one run part-way (its last checkpoint gone, as if killed after step 2) and remove another entirely.
    _, seeds, steps = study.recipe(True)
    part = study.run_dir(out, 4, "static c4", 1)
    os.remove(os.path.join(part, "checkpoints", f"{steps:07d}.pt"))
    gone = study.run_dir(out, 2, "static S=1", 0)
    shutil.rmtree(gone)
    before = {p: os.path.getmtime(p) for p in [os.path.join(study.run_dir(out, 4, "residual", 0), "log.jsonl")]}
    assert study.train(out, tiny=True, log=messages.append) == 2  # only those two
    assert all(os.path.getmtime(p) == t for p, t in before.items())
    resumed = [json.loads(line) for line in open(os.path.join(part, "log.jsonl"))]
    assert any("resumed" in r for r in resumed)
    study.evaluate(out, tiny=True, log=messages.append)
    text = study.report(out, tiny=True)
    table = study.losses(out, tiny=True)
    values = table[(4, "residual")][steps]
    assert len(values) == len(seeds)
    assert "| residual | " in text and study.mean_std(table[(4, "residual")][2]) in text
    assert f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}" in text
    assert os.path.exists(os.path.join(out, "chunk_sweep.png")) and "![loss against S](chunk_sweep.png)" in text
    assert "| 4 (L = 8) | " in text and "| 2 (L = 4) | " in text  # the sweep's row per depth
    assert "Training time of the finished runs, summed: " in text
    assert os.path.exists(os.path.join(out, "diagnose", "diagnostics.json")) and "## Diagnostics at 4 blocks" in text
    for seed, (ours, theirs) in enumerate([(0.5, 0.3), (0.6, 0.35)]):  # what toy_accuracy.py writes, made up
        for name, value in (("static c4", ours), ("residual", theirs)):
            with open(os.path.join(study.run_dir(out, 4, name, seed), "toy_accuracy.txt"), "w") as f:
                f.write(f"classifier epoch 1/4: held-out accuracy 1.0\nclass accuracy of x.pt: {value}\n")
    study.main(["--out", out, "--tiny", "--report-only", "--publish", str(tmp_path / "published")])
    text = (tmp_path / "published" / "REPORT.md").read_text()
    assert "| residual | 0.3250 ± 0.0354 | - |" in text and "| static c4 | 0.5500 ± 0.0707 | 0.0" in text
    published = tmp_path / "published"
    assert (published / "REPORT.md").read_text() == (tmp_path / "study" / "REPORT.md").read_text()
    assert (published / "chunk_sweep.png").exists() and list((published / "diagnose").glob("*.png"))


def test_chunk_optimum_finds_the_bottom_of_a_u_and_none_in_a_slope():
    rng = np.random.default_rng(0)
    sizes = (1, 2, 4, 8, 14)
    u = {s: list(0.2 + 0.01 * (np.log(s) - np.log(5.0)) ** 2 + 1e-4 * rng.standard_normal(3)) for s in sizes}
    fitted, low, high, share = study.optimum(u)
    assert abs(fitted - 5.0) < 0.1 and low <= fitted <= high and high - low < 0.5 and share > 0.95
    slope = {s: list(0.2 + 0.01 * np.log(s) + 1e-4 * rng.standard_normal(3)) for s in sizes}
    assert study.optimum(slope)[::3] == (None, 0.0)


def test_run_seconds_sums_each_log_line_over_its_rate_across_a_resume(tmp_path):
    lines = [dict(step=250, steps_per_s=5.0), dict(step=500, steps_per_s=2.5), dict(step=500, eval_loss=0.3),
             dict(step=500, resumed={}), dict(step=750, steps_per_s=1.0)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert study.run_seconds(str(tmp_path)) == 250 / 5.0 + 250 / 2.5 + 250 / 1.0
