"""pytest set-up: without a GPU, Triton kernels run in its interpreter (it must be chosen before kernel.py loads)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
