"""What a shared cluster does to a run: preemption (SIGTERM or SIGUSR1, then a kill), a rank that dies under
torchrun, a disk that fills, shards damaged on disk, a resume on another number of processes. Each case checks
what the user sees and that nothing already written is lost. Tiny models and the toy data, on the CPU (gloo)."""
import argparse
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import train
from checkpoint import load_checkpoint
from test_faults import ROOT, TINY, files, run_train

STEPS = 60  # the preemption runs: long enough (about a second) that a signal lands mid-run


def uninterrupted(root):
    run_train(root, "--ckpt-every=1000", "--log-every=5", name="whole", steps=STEPS)
    return load_checkpoint(str(root / "whole" / "checkpoints" / f"{STEPS:07d}.pt"))


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The final checkpoint of the run that no signal interrupts."""
    return uninterrupted(tmp_path_factory.mktemp("whole"))


def train_cli(run, *extra, steps=STEPS):
    return [sys.executable, "-u", "train.py", "--data=shapes", *TINY, "--global-batch-size=4", f"--max-steps={steps}",
            "--log-every=5", "--eval-every=0", "--sample-every=0", "--ckpt-every=1000", f"--results-dir={run}", *extra]


def signal_when(proc, said, number):
    """Send `number` to proc once its output shows `said`; returns everything it printed."""
    out = []
    for line in proc.stdout:
        out.append(line)
        if said in line:
            proc.send_signal(number)
            break
    out += proc.stdout.readlines()
    proc.wait(timeout=60)
    return "".join(out)


def test_preemption_checkpoints_at_the_step_and_the_resume_ends_with_the_same_weights(tmp_path, whole, name="SIGTERM"):
    run = tmp_path / "run"
    proc = subprocess.Popen(train_cli(run), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    said = signal_when(proc, "step 10 ", getattr(signal, name))
    assert proc.returncode == 128 + getattr(signal, name), said
    saved = sorted(os.listdir(run / "checkpoints"))
    assert len(saved) == 1 and 10 <= int(saved[0][:-3]) < STEPS, said  # the step it was at, not a later one
    assert f"{name}: stopped at step {int(saved[0][:-3])} with its checkpoint" in said and "--resume=latest" in said
    assert json.loads(open(run / "log.jsonl").readlines()[-1]) == {"step": int(saved[0][:-3]), "preempted": name}
    run_train(tmp_path, "--ckpt-every=1000", "--log-every=5", "--resume=latest", name="run", steps=STEPS)
    resumed = load_checkpoint(str(run / "checkpoints" / f"{STEPS:07d}.pt"))
    assert same(resumed["model"], whole["model"]) and same(resumed["ema"], whole["ema"])
    assert same(resumed["opt"], whole["opt"])


def test_sigusr1_is_noted_like_sigterm_a_second_signal_is_obeyed_and_the_old_handlers_return():
    from cli import Preemption

    seen = []
    before = signal.signal(signal.SIGUSR1, lambda *a: seen.append("old handler"))
    try:
        with Preemption() as preempt:
            assert not preempt.requested()
            os.kill(os.getpid(), signal.SIGUSR1)
            assert preempt.requested() and preempt.signal == signal.SIGUSR1
            assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # a second one would end the process
            with pytest.raises(SystemExit) as stop:
                preempt.stop("kept")
            assert stop.value.code == 128 + signal.SIGUSR1 == 138
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == ["old handler"]
    finally:
        signal.signal(signal.SIGUSR1, before)


def same(a, b):
    """Whether two (nested) states are equal, tensors bit for bit."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


#################################################################################
#            A full disk, for real: a file-size limit (setrlimit)               #
#################################################################################

@pytest.fixture
def file_size_limit():
    """limit(n): from now until the test ends, no file this process writes grows past n bytes (writes fail
    with EFBIG, as on a full disk, instead of the default SIGXFSZ kill)."""
    import resource

    before, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    yield lambda n: resource.setrlimit(resource.RLIMIT_FSIZE, (n, before[1]))
    resource.setrlimit(resource.RLIMIT_FSIZE, before)
    signal.signal(signal.SIGXFSZ, handler)


def refused_on_a_full_disk(write, path, needed, root):
    """write() stops naming `path` and the MiB it needs, removes its partial file and changes nothing else."""
    before = files(root)
    with pytest.raises(SystemExit) as stop:
        write()
    said = str(stop.value)
    assert f"could not write {path} (" in said and f"; it needs about {needed / 2**20:.1f} MiB and " in said, said
    assert "the partial file was removed" in said
    assert files(root) == before and not os.path.exists(f"{path}.tmp")
    return said


def test_a_checkpoint_that_does_not_fit_keeps_the_earlier_ones(tmp_path, file_size_limit):
    from checkpoint import save_checkpoint

    save_checkpoint({"x": torch.zeros(1000)}, str(tmp_path / "0000001.pt"))
    file_size_limit(64 * 1024)
    big = {"model": {"w": torch.zeros(100_000)}, "ema": {"w": torch.zeros(100_000)}}
    said = refused_on_a_full_disk(lambda: save_checkpoint(big, str(tmp_path / "0000002.pt")),
                                  tmp_path / "0000002.pt", 800_000, tmp_path)
    assert "every earlier checkpoint is kept" in said and "--resume" in said


def test_a_sample_batch_and_the_npz_that_do_not_fit_keep_every_finished_batch(tmp_path, file_size_limit):
    import sample

    images = np.zeros((64, 16, 16, 3), np.uint8)
    sample.write_part(str(tmp_path / "000000.npy"), images)
    file_size_limit(8 * 1024)
    refused_on_a_full_disk(lambda: sample.write_part(str(tmp_path / "000001.npy"), images),
                           tmp_path / "000001.npy", images.nbytes, tmp_path)
    parts = [str(tmp_path / "000000.npy")]
    said = refused_on_a_full_disk(lambda: sample.write_npz(str(tmp_path / "out.npz"), parts, 64),
                                  tmp_path / "out.npz", images.nbytes, tmp_path)
    assert "every batch is kept" in said


def test_a_latent_shard_that_does_not_fit_keeps_every_finished_shard(tmp_path, file_size_limit, monkeypatch):
    import prepare_imagenet

    args = argparse.Namespace(image_size=64, dtype="float16", images=True)
    crops = np.zeros((5, 64, 64, 3), np.uint8)

    def encode(tmp):  # what encode_shard writes, without a VAE
        os.makedirs(tmp)
        np.save(os.path.join(tmp, "images.npy"), crops)
    (tmp_path / "shard_00000").mkdir()
    (tmp_path / "shard_00000" / "images.npy").write_bytes(b"finished")
    file_size_limit(16 * 1024)
    needed = prepare_imagenet.shard_bytes(args, 5)
    assert needed == 5 * (4 * 4 * 8 * 8 * 2 + 8 + 3 * 64 * 64)
    path = tmp_path / "shard_00001"
    said = refused_on_a_full_disk(lambda: prepare_imagenet.write_atomically(str(path), encode, needed,
                                                                            "every finished shard is kept"),
                                  path, needed, tmp_path)
    assert "every finished shard is kept" in said


#################################################################################
#              torchrun: a rank that dies, a preemption of every rank           #
#################################################################################

SHORT = 6  # the runs with a dying rank: checkpoints at 2, 4, 6


def torchrun(script, run, *extra, env=None):
    """Two ranks (gloo) of `script` with train_cli's flags, started in a session of their own (so that a test
    can kill every process it left)."""
    flags = train_cli(run, *extra)[3:]  # without python -u train.py
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, *flags]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, start_new_session=True)


SHORT_FLAGS = ("--ckpt-every=2", "--log-every=1", "--eval-every=3", "--eval-samples=8")


@pytest.fixture(scope="module")
def whole_short(tmp_path_factory):
    """The checkpoints (steps 2, 4, 6) of the short run on one process, uninterrupted."""
    root = tmp_path_factory.mktemp("short")
    run_train(root, *SHORT_FLAGS, name="whole", steps=SHORT)
    return {step: load_checkpoint(str(root / "whole" / "checkpoints" / f"{step:07d}.pt")) for step in (2, 4, 6)}


def close(a, b, tolerance=1e-4):
    """Whether two states agree to float rounding: the gradient of one process sums the batch in another order
    than two processes' all-reduce, and AdamW carries the difference on (the largest gap, relative to the
    largest weight, is what is compared)."""
    gap = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"largest difference {gap:.3g}")
    return gap <= tolerance * max(b[k].abs().max().item() for k in b)


@pytest.mark.parametrize("fault", ["step:1:3", "eval:1:1", "checkpoint:0:2"],
                         ids=["rank 1 in step 3", "rank 1 in the evaluation of step 3", "rank 0 writing checkpoint 4"])
def test_a_dying_rank_stops_the_others_and_the_run_resumes_on_one_process(tmp_path, whole_short, fault):
    run = tmp_path / "run"
    proc = torchrun("tests/faulty_train.py", run, *SHORT_FLAGS, f"--max-steps={SHORT}", env={"FAULT": fault})
    try:
        said = proc.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the surviving rank hung in a collective")
    assert proc.returncode != 0, said
    left = sorted(os.listdir(run / "checkpoints"))  # checkpoint 4's half file only under its temporary name
    assert left == ["0000002.pt"] + ["0000004.pt.tmp"] * fault.startswith("checkpoint"), said
    # The same run continues on one process (the global batch in one pass) from the last complete checkpoint.
    run_train(tmp_path, *SHORT_FLAGS, "--resume=latest", name="run", steps=SHORT)
    resumed = load_checkpoint(str(run / "checkpoints" / f"{SHORT:07d}.pt"))
    assert close(resumed["model"], whole_short[SHORT]["model"]) and close(resumed["ema"], whole_short[SHORT]["ema"])


def test_a_one_process_run_resumes_on_two(tmp_path, whole_short):
    run = tmp_path / "run"
    run_train(tmp_path, *SHORT_FLAGS, name="run", steps=2)
    proc = torchrun("train.py", run, *SHORT_FLAGS, "--max-steps=4", "--resume=latest")
    said = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, said
    resumed = load_checkpoint(str(run / "checkpoints" / "0000004.pt"))
    assert close(resumed["model"], whole_short[4]["model"]) and close(resumed["ema"], whole_short[4]["ema"])
    assert not same(resumed["model"], whole_short[2]["model"])  # it did train on


def test_sigterm_to_torchrun_stops_every_rank_at_one_step_and_one_process_resumes(tmp_path, whole):
    run = tmp_path / "run"
    proc = torchrun("train.py", run)
    said = signal_when(proc, "step 10 ", signal.SIGTERM)
    assert proc.returncode != 0
    saved = sorted(os.listdir(run / "checkpoints"))
    assert len(saved) == 1 and 10 <= int(saved[0][:-3]) < STEPS, said
    assert said.count(f"SIGTERM: stopped at step {int(saved[0][:-3])}") == 2, said  # both ranks, the same step
    run_train(tmp_path, "--ckpt-every=1000", "--log-every=5", "--resume=latest", name="run", steps=STEPS)
    resumed = load_checkpoint(str(run / "checkpoints" / f"{STEPS:07d}.pt"))  # 60 steps: 7e-5 measured
    assert close(resumed["model"], whole["model"], 1e-3) and close(resumed["ema"], whole["ema"], 1e-3)


@pytest.mark.parametrize("world, extra, message", [
    (3, [], "--global-batch-size 4 must be divisible by the 3 processes"),
    (2, ["--micro-batch-size=3"], "--micro-batch-size 3 must divide the per-process batch 2"),
])
def test_a_resume_on_a_world_size_that_cannot_split_the_batch_is_refused_before_any_work(tmp_path, monkeypatch,
                                                                                         world, extra, message):
    run_train(tmp_path, "--ckpt-every=2", name="run", steps=2)
    before = files(tmp_path)
    monkeypatch.setattr(train, "setup_distributed", lambda: (0, world, torch.device("cpu")))
    with pytest.raises(SystemExit, match=message):
        run_train(tmp_path, "--ckpt-every=2", "--resume=latest", *extra, name="run", steps=4)
    assert files(tmp_path) == before
