"""gpu_check.py --smoke: the one-command GPU check runs end to end at tiny sizes on a CPU, so it cannot rot
between the sessions that are lent a GPU."""
import os
import subprocess
import sys

import kernel


def test_gpu_check_smoke_runs_every_part(tmp_path):
    here = os.path.dirname(os.path.abspath(__file__))
    out = tmp_path / "report.md"
    run = subprocess.run([sys.executable, "gpu_check.py", "--smoke", f"--out={out}", f"--workdir={tmp_path}"],
                         capture_output=True, text=True, cwd=here, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    report = out.read_text()
    for part in ("parity", "kernel", "configs", "step", "throughput", "exact"):
        assert f"## {part}: ok" in report, report
    pinned = kernel.PINNED["bwd"]  # --configs: a row per config, the pinned one marked
    assert f"| bwd | {pinned.kwargs['U']} | {pinned.num_warps} | {pinned.kwargs['STAGES']} |" in report
    assert "two runs identical: True; resumed run identical: True" in report
    assert "| CPU | SiT-S/2 | dynamic c4 |" in report and "images/s" in report
