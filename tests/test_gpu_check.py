"""tools/gpu_check.py: the one-command GPU check runs end to end at tiny sizes on a CPU (--smoke), so it cannot
rot between the sessions that are lent a GPU, and a run stopped anywhere still brings its figures back."""
import os
import subprocess
import sys

from tools import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = os.path.join(ROOT, "tools", "gpu_check.py")


def run_check(tmp_path, *flags, timeout=400):
    out = tmp_path / "out"  # as $OUT on a lent machine: the one folder that comes back
    run = subprocess.run([sys.executable, CHECK, "--smoke", f"--workdir={tmp_path / 'work'}", *flags],
                         capture_output=True, text=True, cwd=ROOT, timeout=timeout, env={**os.environ, "OUT": str(out)})
    return run, (out / "gpu_check.md").read_text()


def left_running(marker):
    """Processes whose command line names `marker` (every part and its children name their work folder)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(cmdline)
    return found


def test_the_plan_fits_a_third_of_a_lent_machine():
    run = subprocess.run([sys.executable, CHECK, "--plan"], capture_output=True, text=True, cwd=ROOT, check=True)
    names = [line.split()[0] for line in run.stdout.splitlines()]
    assert names == ["parity", "kernel", "step", "configs", "throughput", "exact", "total"]
    assert 0 < float(run.stdout.splitlines()[-1].split()[1]) <= 360


def test_every_parity_test_the_gpu_run_names_exists():
    """The GPU run names its parity tests one by one (to run the hardware-sensitive ones first): a renamed test
    must not silently drop out of it."""
    ids = [f"test_parity.py::{t}" for t in gpu_check.PARITY]
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *ids],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr


def test_gpu_check_smoke_runs_every_part_into_out(tmp_path):
    run, report = run_check(tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    for part in ("parity", "kernel", "step", "configs", "throughput", "exact"):
        assert f"## {part}: ok" in report, report
        assert f"| {part} | ok |" in run.stdout  # the summary, printed last
    assert len(run.stdout) < 12_000
    assert "2 passed" in report  # parity ran its tests without stopping at the first failure
    assert "| fwd | 3 | 8 | 4 | 1 |" in report  # --configs: a row per config (the interpreter's one)
    assert "two runs identical: True" in report and "resumed run identical: True" in report
    assert "| CPU | SiT-S/2 | dynamic c4 |" in report and "images/s" in report
    assert "| CPU | SiT-S/2 | static c4 | auto | 8 x 1 |" in report  # the grad-checkpoint memory row


def test_parts_stopped_at_their_limits_still_leave_a_report_and_no_process(tmp_path):
    """With every limit cut to about a second, each part is stopped (or done) and reported with its output so
    far; the exact part's training run, a grandchild, is killed with it."""
    run, report = run_check(tmp_path, "--limit-scale=0.006", timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    for part in ("parity", "kernel", "step", "configs", "throughput", "exact"):
        section = report.split(f"## {part}: ")[1].split("\n## ")[0]
        assert section.startswith(("ok", "stopped at its limit")), section
    stopped = [p for p in ("kernel", "step", "exact") if f"## {p}: stopped at its limit" in report]
    assert stopped == ["kernel", "step", "exact"], report
    for part in stopped:
        assert f"{part}: started" in report  # the output up to the moment it was stopped
    assert "| exact | stopped at its limit" in run.stdout
    assert not left_running(str(tmp_path / "work")), left_running(str(tmp_path / "work"))
