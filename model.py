"""
SiT, the Scalable Interpolant Transformer (Ma et al. 2024; the DiT architecture of Peebles & Xie 2023),
with a routing switch: `routing="residual"` is SiT exactly (official checkpoints load with strict=True),
"static" | "explicit" | "dynamic" replace its residual stream with Diffusion-Adaptive Routing (dar.py).

Conventions (docs/design.md section 1): SiT's linear interpolant x_t = t * x1 + (1 - t) * eps with
t in [0, 1], t = 0 pure noise and t = 1 data; the network predicts the velocity x1 - eps. Label
`num_classes` is the null class of classifier-free guidance.
"""
import math
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from dar import FINAL_AGGS, KERNELS, ROUTINGS, Routing, SharedGradients


@dataclass
class SiTConfig:
    input_size: int = 32  # height = width of the input: 32 for 256px SD-VAE latents
    patch_size: int = 2  # p: tokens are p x p patches, T = (input_size / p)^2
    in_channels: int = 4  # C: 4 for SD-VAE latents, 3 for pixels
    hidden_size: int = 1152  # d, the width of every token
    depth: int = 28  # transformer blocks; L = 2 * depth sublayers
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1  # how often train.py drops labels to the null class; > 0 adds its row
    num_classes: int = 1000
    learn_sigma: bool = True  # SiT's released models predict 2C channels and drop the second half
    routing: str = "residual"  # "residual" (SiT) or DAR's query variant: "static" | "explicit" | "dynamic"
    chunk: int = 4  # DAR chunk size S in sublayers (Eq. 7); 1 = dense
    final_agg: str = "dedicated"  # DAR final aggregator: "dedicated" (Eq. 11) or "reuse" (the REPA design)
    kernel: str = "auto"  # DAR execution: "auto" | "triton" | "torch"; never changes the function computed

    def __post_init__(self):
        """The one check of the values a model is built from (train.py's flags, a checkpoint's config)."""
        for name, allowed in (("routing", ROUTINGS), ("final_agg", FINAL_AGGS), ("kernel", KERNELS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.input_size % self.patch_size or self.hidden_size % self.num_heads:
            raise ValueError(f"input_size must be a multiple of patch_size and hidden_size of num_heads: {self}")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size must be a multiple of 4 (the 2-D sin-cos position embedding gives each "
                             f"axis half the width, in sines and cosines), got {self.hidden_size}")


def modulate(x, shift, scale):
    """adaLN: x (B, T, d) scaled and shifted by per-sample (B, d) vectors."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                               Embedding layers                                #
#################################################################################

class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> tokens (B, T, d) by a strided convolution over p x p patches."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Scalar t (B,) -> e(t) (B, d): sinusoidal features, then a 2-layer MLP."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """[cos, sin] of t times dim / 2 frequencies from 1 down to 1 / max_period; t is used as is, in [0, 1]."""
        half, dtype = dim // 2, torch.promote_types(t.dtype, torch.float32)
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)
        args = t.to(dtype)[:, None] * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return F.pad(embedding, (0, dim % 2))

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label (B,) -> (B, d). Label `num_classes` is the null class of classifier-free guidance; the
    training loop drops labels to it (train.py), so that its draws are reproducible on any number of GPUs."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + (dropout_prob > 0), hidden_size)  # last row: null class
        self.num_classes = num_classes

    def forward(self, labels):
        return self.embedding_table(labels)


#################################################################################
#                                   SiT blocks                                  #
#################################################################################

class Attention(nn.Module):
    """Multi-head self-attention; the fused qkv layout of timm's Attention, so SiT checkpoints load."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, d / heads)
        return self.proj(x.transpose(1, 2).reshape(B, T, d))


class Mlp(nn.Module):
    """Two linears with tanh-approximated GELU between them (timm's Mlp key names)."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiTBlock(nn.Module):
    """A transformer block with adaLN-Zero conditioning: an attention sublayer and an MLP sublayer."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def modulations(self, c):
        """((shift, scale, gate) of the attention sublayer, (shift, scale, gate) of the MLP), each (B, d)."""
        m = self.adaLN_modulation(c).chunk(6, dim=1)
        return m[:3], m[3:]

    def forward(self, x, c):
        """Residual routing, Eq. (1): each sublayer adds its gated output to the stream."""
        (shift_msa, scale_msa, gate_msa), (shift_mlp, scale_mlp, gate_mlp) = self.modulations(c)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """LayerNorm, adaLN shift and scale, then a linear map of each token to its p x p x C_out patch."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


#################################################################################
#                                  The model                                    #
#################################################################################

class SiT(nn.Module):
    """SiT with residual routing or DAR. Keyword arguments are the fields of SiTConfig."""

    def __init__(self, **kwargs):
        super().__init__()
        self.config = cfg = SiTConfig(**kwargs)
        self.out_channels = cfg.in_channels * 2 if cfg.learn_sigma else cfg.in_channels
        d = cfg.hidden_size

        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, d)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(cfg.num_classes, d, cfg.class_dropout_prob)
        num_patches = (cfg.input_size // cfg.patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, d), requires_grad=False)  # fixed 2D sin-cos
        self.blocks = nn.ModuleList([SiTBlock(d, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(d, cfg.patch_size, self.out_channels)
        if cfg.routing != "residual":
            self.routers = Routing(d, 2 * cfg.depth, cfg.routing, cfg.chunk, cfg.final_agg, cfg.kernel)
        self.grad_checkpoint = False  # recompute blocks (residual) or sublayers (DAR) in the backward to save memory
        self.initialize_weights()

    def initialize_weights(self):
        # Transformer linears: Xavier-uniform weights, zero biases.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        # Fixed sin-cos position embedding.
        grid = int(self.pos_embed.shape[1] ** 0.5)
        self.pos_embed.data.copy_(torch.from_numpy(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)).float()[None])

        # Patch embedding initialised as the linear map it is.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)

        # Label table and timestep MLP: N(0, 0.02).
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every block starts as the identity, and the output starts at zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

        if self.config.routing == "residual":
            return
        # DAR: zero queries and unit key gains, so every aggregator starts as a uniform average.
        for router in self.routers.values():
            router.reset_parameters()
        if self.config.routing == "explicit":
            # e(t) = 0 at step 0, so explicit starts exactly as static (paper, "Timestep injection").
            nn.init.zeros_(self.t_embedder.mlp[2].weight)
            nn.init.zeros_(self.t_embedder.mlp[2].bias)

    def unpatchify(self, x):
        """(B, T, p * p * C) -> (B, C, H, W)."""
        c, p = self.out_channels, self.config.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y, return_states=False, return_weights=False, states_at=None, outputs_at=()):
        """Predict the velocity x1 - eps at x_t (t = 0 noise, t = 1 data).

        x: (B, C, H, W) the noisy input x_t; t: (B,) in [0, 1]; y: (B,) labels, num_classes = null class.
        Returns (B, C, H, W). With return_states and/or return_weights, returns (velocity, extras) with
          extras["z"]      list of depth tensors (B, T, d): z_k, the state after block k (design.md section 2);
                           states_at, blocks k (REPA: (8,)), keeps only those and leaves None for the others
          extras["alpha"]  list of L + 1 tensors (B, T, |S_l|): each aggregator's routing weights (DAR;
                           empty for residual); asking for them runs DAR on the reference path.
          extras["v"]      with outputs_at (DAR), {l: v_l (B, T, d)}, the outputs of those sublayers (REPA's
                           --repa-state=summary aligns v_2k, a chunk summary when S divides 2k).
        """
        self._check_inputs(x, t, y)
        v0 = self.x_embedder(x) + self.pos_embed  # (B, T, d)
        e = self.t_embedder(t)  # (B, d)
        c = e + self.y_embedder(y)  # (B, d)
        depth = self.config.depth
        need_z = set(range(1, depth + 1) if states_at is None else states_at) if return_states else set()
        if not need_z <= set(range(1, depth + 1)):
            raise ValueError(f"states_at names blocks 1..{depth}, got {sorted(need_z)}")
        extras = {"z": [None] * depth, "alpha": [], "v": {}}
        if outputs_at and (self.config.routing == "residual" or not set(outputs_at) <= set(range(1, 2 * depth + 1))):
            raise ValueError(f"outputs_at names DAR sublayers 1..{2 * depth}, got {outputs_at} ({self.config.routing})")
        if self.config.routing == "residual":
            h = v0
            for k, block in enumerate(self.blocks, start=1):
                h = self._maybe_checkpoint(block, h, c)
                if k in need_z:
                    extras["z"][k - 1] = h
            out = self.final_layer(h, c)  # (B, T, p * p * C_out)
        else:
            out = self.forward_dar(v0, c, e, extras, need_z, need_alpha=return_weights, need_v=set(outputs_at))
        out = self.unpatchify(out)
        if self.config.learn_sigma:
            out = out[:, : self.config.in_channels]
        wanted = [k for k, asked in (("z", return_states), ("alpha", return_weights), ("v", outputs_at)) if asked]
        return (out, {key: extras[key] for key in wanted}) if wanted else out

    def forward_dar(self, v0, c, e, extras, need_z=(), need_alpha=False, need_v=()):
        """The sublayers and the final layer under DAR; returns the final linear's output.

        Sublayer l = 1..L (attention for odd l, MLP for even) reads x = modulate(LN(h_l)), h_l the aggregation of
        its sources S_l (Eq. 5-7), and outputs v_l = gate_l * f_l(x); aggregator L + 1 (Eq. 11) feeds the final
        linear. routers.aggregate applies the LayerNorm (no affine, eps 1e-6, as norm1, norm2 and norm_final)
        and adaLN modulate itself, so those norms and FinalLayer.forward are not called here.
        """
        L = 2 * self.config.depth
        f = [sublayer for block in self.blocks for sublayer in (block.attn, block.mlp)]  # f[l - 1] is f_l
        mods = [m for block in self.blocks for m in block.modulations(c)]  # (shift, scale, gate) of sublayer l
        mods.append((*self.final_layer.adaLN_modulation(c).chunk(2, dim=1), None))
        if v0.device.type != "meta" and torch.is_autocast_enabled(v0.device.type):  # (meta: forward_flops)
            v0 = v0.to(torch.get_autocast_dtype(v0.device.type))  # the embedding adds an fp32 table; one dtype for all
        v = {0: v0.contiguous()}  # v_i, for every i that a later aggregator still reads
        shared = SharedGradients(self.routers.last_reader)
        for l in range(1, L + 2):
            shift, scale, gate = mods[l - 1]
            k = (l - 1) // 2 if l % 2 else None  # z_k = h_{2k+1}: the input of block k + 1, or of the final layer
            x, h, alpha = self.routers.aggregate(l, v, e, shift, scale, k in need_z, need_alpha, shared)
            if k in need_z:
                extras["z"][k - 1] = h
            if alpha is not None:
                extras["alpha"].append(alpha)
            if l <= L:
                v[l] = gate.unsqueeze(1) * self._maybe_checkpoint(f[l - 1], x)  # v_l, its adaLN-Zero gate included
                if l in need_v:
                    extras["v"][l] = v[l]
                v = {i: v_i for i, v_i in v.items() if self.routers.last_reader[i] > l}
        return self.final_layer.linear(x)

    def _maybe_checkpoint(self, f, *args):
        if self.grad_checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(f, *args, use_reentrant=False)
        return f(*args)

    def forward_with_cfg(self, x, t, y, cfg_scale, legacy_channels=False):
        """Classifier-free guidance, batched: x is [x; x] and y is [labels; null] (only x's first half is read).

        Returns [v; v] with v = v_null + cfg_scale * (v_label - v_null). Guidance acts on all channels;
        legacy_channels=True guides only the first 3, as SiT's and DiT's released samplers do: use it only to
        reproduce their published numbers (DiT PR #12: cfg 1.5 on 3 of 4 channels is about cfg 1.375 on all).
        """
        half = x[: len(x) // 2]
        out = self(torch.cat([half, half]), t, y)
        n = 3 if legacy_channels else out.shape[1]
        cond, uncond = out[:, :n].chunk(2)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided]), out[:, n:]], dim=1)

    def _check_inputs(self, x, t, y):
        cfg = self.config
        expected = (cfg.in_channels, cfg.input_size, cfg.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must be (B, {', '.join(map(str, expected))}) for this model, got {tuple(x.shape)}")
        if t.shape != (x.shape[0],) or y.shape != (x.shape[0],):
            raise ValueError(f"t and y must be ({x.shape[0]},), one per sample; got {tuple(t.shape)} and {tuple(y.shape)}")


#################################################################################
#                       2D sine-cosine position embedding                       #
#################################################################################

def get_2d_sincos_pos_embed(dim, grid_size):
    """(grid_size^2, dim): the first half of the channels encodes the column, the second half the row
    (MAE's layout, which SiT's checkpoints store)."""
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64), indexing="ij")
    return np.concatenate([_1d_sincos(dim // 2, cols), _1d_sincos(dim // 2, rows)], axis=1)


def _1d_sincos(dim, pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
    out = pos.reshape(-1)[:, None] * omega[None]  # (M, dim / 2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


#################################################################################
#                                 The interpolant                               #
#################################################################################

def interpolate(x1, eps, t):
    """SiT's linear interpolant: x_t = t * x1 + (1 - t) * eps (t = 0 noise, t = 1 data) and its velocity
    x1 - eps, the regression target of training."""
    t = t.view(-1, *([1] * (x1.dim() - 1)))
    return t * x1 + (1 - t) * eps, x1 - eps


#################################################################################
#                                    Presets                                    #
#################################################################################

SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}  # depth, width, heads
SiT_models = {
    f"SiT-{size}/{p}": partial(SiT, depth=depth, hidden_size=width, num_heads=heads, patch_size=p)
    for size, (depth, width, heads) in SIZES.items()
    for p in (2, 4, 8)
}


def model_config(model):
    """The dict a checkpoint stores to rebuild `model` with SiT(**config)."""
    return asdict(model.config)


def forward_flops(config):
    """Matmul and attention FLOPs (2 per multiply-add) of one image's forward pass, for a model config dict,
    counted on the meta device (nothing is allocated)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = SiT(**config)
    cfg = model.config
    x = torch.zeros(1, cfg.in_channels, cfg.input_size, cfg.input_size, device="meta")
    t, y = torch.zeros(1, device="meta"), torch.zeros(1, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(x, t, y)
    return counter.get_total_flops()
