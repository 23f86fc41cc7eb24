"""
REPA (Yu et al. 2025, "Representation Alignment for Generation"): a projection of an intermediate SiT state
z_k is pulled towards the patch features of a frozen DINOv2 ViT-B/14 by a negative-cosine loss.

Its own file because the encoder is a whole ViT: a plain-PyTorch DINOv2 ViT-B/14 with the official key names
(the released dinov2_vitb14_pretrain.pth loads with strict=True, no torch.hub), REPA's preprocessing and
position-embedding resample, the projector and the loss. Facts: the public code of DINOv2
(facebookresearch/dinov2) and of REPA.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import load_checkpoint
from model import Attention  # the same fused-qkv layout and key names as DINOv2's

DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as DINOv2


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn, self.ls1 = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads), LayerScale(dim)
        self.norm2, self.mlp, self.ls2 = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, 4 * dim), LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, dim, patch):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class DINOv2(nn.Module):
    """DINOv2 ViT-B/14 (no registers), as released: 518px position grid (37 x 37), LayerScale, eps 1e-6."""

    def __init__(self, dim=768, depth=12, heads=12, patch=14, grid=37):
        super().__init__()
        self.embed_dim, self.patch = dim, patch
        self.patch_embed = PatchEmbed(dim, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # used only in DINOv2's training; kept for strict loading
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def resample_pos_embed(self, grid):
        """Resize the patch position grid once, as REPA does with timm's resample_abs_pos_embed (bicubic,
        antialiased, fp32), so 224px inputs (16 x 16 patches) use it without interpolation."""
        cls, patches = self.pos_embed.data[:, :1], self.pos_embed.data[:, 1:]
        old = int(patches.shape[1] ** 0.5)
        patches = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
        patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
        self.pos_embed = nn.Parameter(torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], 1))

    def forward(self, x):
        """Normalised patch tokens (B, (H / 14) * (W / 14), 768): DINOv2's x_norm_patchtokens."""
        x = self.patch_embed(x)
        if x.shape[1] + 1 != self.pos_embed.shape[1]:
            raise ValueError(f"{x.shape[1]} patches, but the position embedding has {self.pos_embed.shape[1] - 1}")
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1:]


def load_encoder(source, tokens=256):
    """The frozen REPA encoder: DINOv2 ViT-B/14 from a local path or URL of dinov2_vitb14_pretrain.pth, its
    position grid resampled to `tokens` patches. source="random" builds a randomly initialised encoder of
    the real architecture (tests and benchmarks only: it teaches nothing)."""
    encoder = DINOv2()
    if source == "random":
        nn.init.normal_(encoder.pos_embed, std=0.02)
        nn.init.normal_(encoder.cls_token, std=0.02)
    else:
        encoder.load_state_dict(load_checkpoint(source), strict=True)
    encoder.resample_pos_embed(int(tokens ** 0.5))
    return encoder.eval().requires_grad_(False)


def input_size(pixels):
    """The side DINOv2 sees for images of `pixels` px: 224 * (pixels // 256), as REPA (224 for 256px images and
    smaller toy ones, 448 for 512px), so 16 x 16 or 32 x 32 patches of 14 px."""
    return 224 * max(1, pixels // 256)


def preprocess(images):
    """uint8 images (B, H, W, 3) -> DINOv2's input: /255, ImageNet mean/std, then a bicubic resize to
    input_size(H), in REPA's order."""
    x = images.permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(IMAGENET_MEAN, device=x.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=x.device)[:, None, None]
    size = input_size(images.shape[1])
    return F.interpolate((x - mean) / std, size=(size, size), mode="bicubic", align_corners=False)


def projector(hidden_size, out_dim=768, width=2048):
    """REPA's 3-layer MLP from a SiT token to the encoder's feature space, initialised as REPA's is (its model's
    initialize_weights covers the projector: Xavier-uniform weights, zero biases), not with PyTorch's default."""
    mlp = nn.Sequential(nn.Linear(hidden_size, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                        nn.Linear(width, out_dim))
    for layer in mlp[::2]:
        nn.init.xavier_uniform_(layer.weight)
        nn.init.zeros_(layer.bias)
    return mlp


def alignment_loss(projected, features):
    """Negative cosine similarity per token, averaged over tokens and batch (so it is negative, down to -1)."""
    return -F.cosine_similarity(projected.float(), features.float(), dim=-1).mean()
