"""train.py with one fault injected into one rank, for tests/test_cluster_faults.py under torchrun:

    FAULT=step:1:3 python -m torch.distributed.run --nproc_per_node=2 tests/faulty_train.py <train.py flags>

FAULT is where:rank:n. The rank is killed (SIGKILL, as the OOM killer or a lost node does) in its n-th training
step (where=step), held-out evaluation (eval) or checkpoint write (checkpoint: half a file written under the
temporary name first; only rank 0 writes)."""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402

where, rank, n = os.environ["FAULT"].split(":")
calls = []


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def faulty(name):
    original = getattr(train, name)

    def wrapped(*args, **kwargs):
        calls.append(name)
        if calls.count(name) == int(n):
            if where == "checkpoint":
                with open(f"{args[1]}.tmp", "wb") as f:
                    f.write(b"PK\x03\x04 half a checkpoint")
            die()
        return original(*args, **kwargs)
    setattr(train, name, wrapped)


if int(os.environ.get("RANK", 0)) == int(rank):
    faulty({"step": "train_step", "eval": "evaluate", "checkpoint": "save_checkpoint"}[where])
train.main(train.parse_args())
