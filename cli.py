"""
What every script shares: the --help that shows each option's default, and the set-up of its processes
(torchrun's, or one). A file of its own so that data.py holds only data and train.py only the recipe.
"""
import argparse
import os


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The scripts' --help: their docstring as written, and every option's default (unless its help already says
    it, or there is none to show), so that no flag's value is a surprise (--data=shapes alone means SiT-XL/2)."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def check_values(p, args, at_least=None, positive=(), within=None, readable=(), writable=()):
    """Refuse impossible flag values before any work, each with p.error (usage, the flag, the value, exit 2).
    at_least: {name: minimum}; positive: names that must be above 0; within: {name: (low, high)}, inclusive;
    readable: flags naming a file or directory that must exist and be readable (URLs and "random" pass: they
    are fetched or made later); writable: flags naming an output whose nearest existing folder must be a
    writable directory. Unset (None) flags pass."""
    flag = lambda name: "--" + name.replace("_", "-")
    for name, low in (at_least or {}).items():
        value = getattr(args, name)
        if value is not None and value < low:
            p.error(f"{flag(name)} must be at least {low}, got {value}")
    for name in positive:
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            p.error(f"{flag(name)} must be above 0, got {getattr(args, name)}")
    for name, (low, high) in (within or {}).items():
        value = getattr(args, name)
        if value is not None and not low <= value <= high:
            p.error(f"{flag(name)} must be in [{low}, {high}], got {value}")
    for name in readable:
        path = getattr(args, name)
        if path is None or "://" in path or path == "random":
            continue
        if not os.path.exists(path):
            p.error(f"{flag(name)} {path}: no such file or directory")
        if not os.access(path, os.R_OK):
            p.error(f"{flag(name)} {path} cannot be read (permissions): fix them or give a copy you can read")
    for name in writable:
        path = getattr(args, name)
        if path is None:
            continue
        parent = os.path.abspath(path)  # a folder that exists is written into; a file is written beside
        parent = parent if os.path.isdir(parent) else os.path.dirname(parent)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            p.error(f"{flag(name)} {path} cannot be written: {parent} is not a directory this user can write to")


def setup_distributed():
    """(rank, world size, device): torchrun's variables when present (NCCL on GPUs, gloo on CPUs), else one
    process on the GPU if there is one."""
    import torch  # here, so that a script's --help (and tools/gpu_check.py's parts) start without loading torch
    import torch.distributed as dist

    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return rank, world, device


def close_distributed():
    """Shut the process group down, if there is one, once main() has returned and nothing uses it any more:
    DDP's reducer holds the group, and a group shut down under it or left to the interpreter's exit can abort a
    rank after a finished run ("terminate called without an active exception", seen once in CI)."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()  # the objects of main() that hold the group, in cycles a plain return does not free
        dist.destroy_process_group()


class Preemption:
    """SIGTERM and SIGUSR1, what a cluster's scheduler sends some minutes before it kills a job, noted instead of
    obeyed: the script asks `requested()` at its safe points (train.py after each step, sample.py and
    prepare_imagenet.py after each finished batch or shard), saves what it has and calls `stop()`. A second
    signal is obeyed at once (the default action), so a user who means it is not kept waiting. A context: the
    handlers that were there before come back when it ends.

        with Preemption() as preempt:
            for shard in todo:
                ...  # write the shard
                if preempt.requested():
                    preempt.stop("every finished shard is kept; run the same command to continue")
    """

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __enter__(self):
        import signal

        self.signal, self.before = None, {name: signal.getsignal(getattr(signal, name)) for name in self.SIGNALS}
        for name in self.SIGNALS:
            signal.signal(getattr(signal, name), self._note)
        return self

    def __exit__(self, *exc):
        import signal

        for name, handler in self.before.items():
            signal.signal(getattr(signal, name), handler)

    def _note(self, signum, frame):
        import signal

        self.signal = signal.Signals(signum)
        for name in self.SIGNALS:
            signal.signal(getattr(signal, name), signal.SIG_DFL)

    def requested(self, world=1, device=None):
        """Whether a signal has come to this process, or with world > 1 to any rank (a collective: every rank
        must ask at the same point, and they all get the same answer, so they stop at the same step)."""
        if world == 1:
            return self.signal is not None
        import torch
        import torch.distributed as dist

        flag = torch.tensor([float(self.signal is not None)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def stop(self, what):
        """Exit with 128 + the signal's number (143 for SIGTERM), the status of a process the signal killed, so
        that a job script or torchrun sees that the work is not finished; `what` says what was kept."""
        import signal

        number = self.signal or signal.SIGTERM  # another rank's signal when this one had none
        print(f"{signal.Signals(number).name}: {what}", flush=True)
        raise SystemExit(128 + number)
