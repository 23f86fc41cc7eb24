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
