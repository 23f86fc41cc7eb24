"""
Sampling from SiT on its linear interpolant, integrating from t = 0 (pure noise) to t = 1 (data).

So far: the ODE sampler (Euler or Heun on a uniform grid) with classifier-free guidance, and PNG grids;
train.py draws its EMA sample grids with them.
"""
import numpy as np
import torch
from PIL import Image


@torch.no_grad()
def sample_ode(model, z, y, num_steps=50, cfg_scale=1.0, heun=True, legacy_cfg=False):
    """Integrate dx/dt = v(x, t, y) from x = z at t = 0 (noise) to t = 1 (data) in num_steps uniform steps.

    Heun costs two model calls per step (125 steps = 250 function evaluations), Euler one. With cfg_scale != 1
    each call runs the batch twice, with labels and with the null class (model.forward_with_cfg).
    """
    null = torch.full_like(y, model.config.num_classes)

    def velocity(x, t):
        t = torch.full((len(x),), t, device=x.device, dtype=x.dtype)
        if cfg_scale == 1.0:
            return model(x, t, y)
        out = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), cfg_scale, legacy_cfg)
        return out[: len(x)]

    ts = torch.linspace(0, 1, num_steps + 1).tolist()
    x = z
    for t0, t1 in zip(ts[:-1], ts[1:]):
        v0 = velocity(x, t0)
        if heun:
            x = x + (t1 - t0) * (v0 + velocity(x + (t1 - t0) * v0, t1)) / 2
        else:
            x = x + (t1 - t0) * v0
    return x


def to_uint8(x):
    """Model-space pixels in [-1, 1], (B, 3, H, W) -> uint8 (B, H, W, 3)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images, path, nrow):
    """Write uint8 images (B, H, W, 3) as one PNG, nrow images per row."""
    B, H, W, C = images.shape
    rows = -(-B // nrow)
    grid = np.zeros((rows * H, nrow * W, C), dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        grid[r * H:(r + 1) * H, c * W:(c + 1) * W] = img
    Image.fromarray(grid).save(path)
