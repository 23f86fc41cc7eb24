"""
The Stable Diffusion VAE (AutoencoderKL, kl-f8) that maps 256x256 images to the 4x32x32 latents SiT models,
in plain PyTorch: prepare_imagenet.py encodes with it and sample.py decodes with it.

Its own file because it is a whole network (83.7M parameters) that two scripts share. Module names equal
diffusers' key paths, so stabilityai/sd-vae-ft-ema (or -mse: the same encoder, a different decoder) loads with
strict=True from its .bin or .safetensors file, old attention names (query/key/value/proj_attn) included.
Facts: diffusers' AutoencoderKL and the sd-vae-ft-ema release.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import load_checkpoint

VAE_URL = "https://huggingface.co/stabilityai/sd-vae-ft-ema/resolve/main/diffusion_pytorch_model.safetensors"
CHANNELS = (128, 256, 512, 512)  # block_out_channels of every SD kl-f8 VAE: 3 halvings, 256px -> 32px


def GroupNorm(channels):
    return nn.GroupNorm(32, channels, eps=1e-6)  # eps 1e-6 everywhere, not PyTorch's 1e-5


class ResnetBlock2D(nn.Module):
    """GN -> SiLU -> conv -> GN -> SiLU -> conv, plus the input (through a 1x1 conv where widths differ)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = GroupNorm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = GroupNorm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.conv_shortcut(x) + h


class Downsample2D(nn.Module):
    """A stride-2 3x3 conv after padding one zero row and column at the bottom and right only: a symmetric
    padding=1 gives the same shape but a shifted grid, the classic bug of VAE ports."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Attention(nn.Module):
    """Single-head self-attention over the pixels of the 32x32 bottleneck, with a residual."""

    def __init__(self, channels):
        super().__init__()
        self.group_norm = GroupNorm(channels)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # key "to_out.0", as diffusers

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        h = F.scaled_dot_product_attention(self.to_q(h)[:, None], self.to_k(h)[:, None], self.to_v(h)[:, None])
        h = self.to_out[0](h[:, 0])
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class MidBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(channels)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Block(nn.Module):
    """A resolution level: `layers` resnets, then a down- or upsampler unless it is the last level."""

    def __init__(self, cin, cout, layers, resample):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(cin if i == 0 else cout, cout) for i in range(layers)])
        if resample is Downsample2D:
            self.downsamplers = nn.ModuleList([resample(cout)])
        elif resample is Upsample2D:
            self.upsamplers = nn.ModuleList([resample(cout)])

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        for resample in getattr(self, "downsamplers", getattr(self, "upsamplers", [])):
            x = resample(x)
        return x


class Encoder(nn.Module):
    def __init__(self, channels=CHANNELS, latent_channels=4):
        super().__init__()
        self.conv_in = nn.Conv2d(3, channels[0], 3, padding=1)
        last = len(channels) - 1
        self.down_blocks = nn.ModuleList([
            Block(channels[max(i - 1, 0)], c, 2, Downsample2D if i < last else None) for i, c in enumerate(channels)])
        self.mid_block = MidBlock(channels[-1])
        self.conv_norm_out = GroupNorm(channels[-1])
        self.conv_out = nn.Conv2d(channels[-1], 2 * latent_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, channels=CHANNELS, latent_channels=4):
        super().__init__()
        up = channels[::-1]  # diffusers' up_blocks.0 is the 32px level
        self.conv_in = nn.Conv2d(latent_channels, up[0], 3, padding=1)
        self.mid_block = MidBlock(up[0])
        last = len(up) - 1
        self.up_blocks = nn.ModuleList([
            Block(up[max(i - 1, 0)], c, 3, Upsample2D if i < last else None) for i, c in enumerate(up)])
        self.conv_norm_out = GroupNorm(up[-1])
        self.conv_out = nn.Conv2d(up[-1], 3, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """Images in [-1, 1], (B, 3, H, W) <-> unscaled latents (B, 4, H/8, W/8). Callers multiply latents by
    data.LATENT_SCALE (0.18215) for the model and divide by it before decoding."""

    def __init__(self, channels=CHANNELS, latent_channels=4):
        super().__init__()
        self.encoder = Encoder(channels, latent_channels)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.decoder = Decoder(channels, latent_channels)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)

    def encode(self, x):
        """The diagonal Gaussian posterior: (mean, std), each (B, 4, H/8, W/8)."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


def diffusers_names(state):
    """Rename the attention keys of checkpoints saved before diffusers 0.17 (query, key, value, proj_attn) to
    today's (to_q, to_k, to_v, to_out.0), and squeeze 1x1-conv attention weights (C, C, 1, 1) to (C, C)."""
    renames = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    out = {}
    for key, value in state.items():
        for old, new in renames.items():
            key = key.replace(old, new)
        if ".attentions." in key and value.dim() == 4:
            value = value[:, :, 0, 0]
        out[key] = value
    return out


def load_vae(source=VAE_URL):
    """The SD-VAE from a local path or URL of diffusion_pytorch_model.{safetensors,bin} (sd-vae-ft-ema by
    default), in eval mode without gradients. source="random" gives a randomly initialised VAE of the real
    architecture, for tests and dry runs only: its latents mean nothing."""
    with torch.random.fork_rng():
        torch.manual_seed(0)  # "random" is the same network in every process and every run
        vae = AutoencoderKL()
    if source != "random":
        vae.load_state_dict(diffusers_names(load_checkpoint(source)), strict=True)
    return vae.eval().requires_grad_(False)
