"""
Parameter counts and forward GFLOPs of every SiT preset (S/B/L/XL, patch 2/4/8) under every routing, counted on
the meta device (nothing is allocated):

    python tools/presets.py

At SiT-XL/2 it gives the paper's Table 1: residual 675,129,632, static and explicit c4 675.26M, dynamic c4
750.84M.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules

from dar import ROUTINGS  # noqa: E402
from model import SiT_models, forward_flops, model_config  # noqa: E402


def aggregation_gflops(model):
    """DAR's aggregation, elementwise and so not in forward_flops: about 6 FLOPs per source element (sum of
    squares, q . k, weighted sum), over T tokens of width d."""
    cfg = model.config
    if cfg.routing == "residual":
        return 0.0
    T = (cfg.input_size // cfg.patch_size) ** 2
    return 6 * T * cfg.hidden_size * sum(len(S) for S in model.routers.source_sets) / 1e9


if __name__ == "__main__":
    print(f"{'':<10}" + "".join(f" | {r:<29}" for r in ROUTINGS))
    print(f"{'preset':<10}" + " | parameters    GFLOPs   +agg  " * len(ROUTINGS))
    for name, build in SiT_models.items():
        row = f"{name:<10}"
        for routing in ROUTINGS:
            with torch.device("meta"):
                model = build(routing=routing)
            params = sum(p.numel() for p in model.parameters())
            gflops = forward_flops(model_config(model)) / 1e9
            row += f" | {params:>13,} {gflops:>7.1f} {aggregation_gflops(model):>5.2f}  "
        print(row)
    print("256x256 images as 4x32x32 SD-VAE latents, chunk 4, dedicated final aggregator. parameters include the"
          "\nfrozen pos_embed; GFLOPs count 2 per multiply-add (DiT's paper counts 1: 118.6 for XL/2); +agg is"
          "\nDAR's elementwise aggregation, memory-bound in practice.")
