"""The SD v1 autoencoder (KL-f8): image [b, 3, H, W] in [-1, 1] <-> latents [b, 4, H/8, W/8].

Letters: b batch, c channels, h w spatial. Named like the diffusers-layout checkpoint.
"""
from dataclasses import dataclass

import torch.nn.functional as F
from einops import rearrange
from torch import nn


@dataclass(frozen=True)
class VAEConfig:
    """SD v1 values (CompVis v1-inference.yaml, first_stage_config); tiny models override."""
    image_channels: int = 3
    latent_channels: int = 4
    channels: tuple[int, ...] = (128, 256, 512, 512)   # 4 levels: 3 resamplings, latents are H/8
    layers_per_block: int = 2
    groups: int = 32
    scale: float = 0.18215   # latent scaling factor of SD v1 (scale_factor in the LDM config)


def norm(c: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, c, eps=1e-6)   # the autoencoder uses eps 1e-6 throughout


class ResBlock(nn.Module):
    """Two 3x3 convs with a residual; no timestep."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over all pixels, with a residual (the mid block's)."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.group_norm = norm(c, groups)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])

    def forward(self, x):
        h, w = x.shape[-2:]
        y = rearrange(self.group_norm(x), "b c h w -> b 1 (h w) c")
        y = F.scaled_dot_product_attention(self.to_q(y), self.to_k(y), self.to_v(y))
        return x + rearrange(self.to_out[0](y), "b 1 (h w) c -> b c h w", h=h, w=w)


class MidBlock(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(c, c, groups), ResBlock(c, c, groups)])
        self.attentions = nn.ModuleList([SelfAttention(c, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        # the LDM autoencoder pads only right and bottom before its stride-2 conv
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, last: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResBlock(cin if j == 0 else cout, cout, groups) for j in range(layers))
        self.downsamplers = None if last else nn.ModuleList([Downsample(cout)])

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, last: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResBlock(cin if j == 0 else cout, cout, groups) for j in range(layers))
        self.upsamplers = None if last else nn.ModuleList([Upsample(cout)])

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Encoder(nn.Module):
    """Image -> mean and log-variance of the latent posterior (before quant_conv)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, levels = cfg.channels, len(cfg.channels)
        self.conv_in = nn.Conv2d(cfg.image_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, cfg.groups, last=i == levels - 1)
            for i in range(levels))
        self.mid_block = MidBlock(ch[-1], cfg.groups)
        self.conv_norm_out = norm(ch[-1], cfg.groups)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, levels = cfg.channels[::-1], len(cfg.channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], cfg.groups)
        # one more resnet per level than the encoder (layers_per_block + 1), as in the LDM decoder
        self.up_blocks = nn.ModuleList(
            UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, cfg.groups, last=i == levels - 1)
            for i in range(levels))
        self.conv_norm_out = norm(ch[-1], cfg.groups)
        self.conv_out = nn.Conv2d(ch[-1], cfg.image_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.cfg = cfg
        z2 = 2 * cfg.latent_channels
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(z2, z2, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        self.decoder = Decoder(cfg)

    def posterior(self, image):
        """Mean and log-variance of the diagonal Gaussian q(z | image), unscaled."""
        mean, logvar = self.quant_conv(self.encoder(image)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, image):
        """Image in [-1, 1] -> scaled latents z0 (the posterior mean, as P2P editing uses)."""
        return self.posterior(image)[0] * self.cfg.scale

    def decode(self, latents):
        """Scaled latents -> image in about [-1, 1]."""
        return self.decoder(self.post_quant_conv(latents / self.cfg.scale))
