"""pytest set-up: without a GPU, Triton kernels run in its interpreter (it must be chosen before kernel.py loads).
The suite is test_parity.py and tests/: nothing under results/ or data/ (a study's copy of the repository, say)
is collected, nor the virtualenv."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

collect_ignore_glob = ["results/*", "data/*", ".venv/*"]
