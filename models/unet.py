"""The Stable Diffusion UNet (v1 and 2.x), named like the diffusers-layout checkpoint.

Letters: b batch, c channels, h w spatial, n = h*w tokens, m = 77 context tokens.
Level i of the UNet runs at latent size / 2**i; down_blocks.i is level i, up_blocks.i is
level (levels - 1 - i).
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import Attention, Site


@dataclass(frozen=True)
class UNetConfig:
    """SD v1 values (CompVis v1-inference.yaml); SD 2 (v2-inference.yaml) sets context_dim 1024,
    head_dim 64 and linear_projection; tiny test models override fields."""
    in_channels: int = 4
    out_channels: int = 4
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    attention: tuple[bool, ...] = (True, True, True, False)   # which levels carry transformers
    layers_per_block: int = 2
    context_dim: int = 768           # width of the text encoder: CLIP ViT-L/14 (SD 2: OpenCLIP ViT-H/14, 1024)
    heads: int = 8                   # SD v1: 8 heads at every level (num_heads) ...
    head_dim: int | None = None      # ... SD 2: 64-wide heads instead, channels / 64 per level (num_head_channels)
    linear_projection: bool = False  # SD 2: proj_in / proj_out are Linear layers, SD v1 1x1 convs
    transformer_depth: int = 1
    groups: int = 32                 # GroupNorm groups everywhere in SD

    def heads_at(self, level: int) -> int:
        return self.channels[level] // self.head_dim if self.head_dim else self.heads


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of SD (cos first, max period 10000): [b] -> [b, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepMLP(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, out)
        self.linear_2 = nn.Linear(out, out)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResBlock(nn.Module):
    """Two 3x3 convs with the timestep embedding added between them; eps 1e-5 (torch default)."""

    def __init__(self, cin: int, cout: int, temb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        # net.1 was a dropout in the reference; the placeholder keeps net.2 at its checkpoint name
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, GEGLU feed-forward; pre-norm, residual."""

    def __init__(self, dim: int, context_dim: int, heads: int, name: str, place: str, level: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, Site(f"{name}.attn1", place, level, False, heads))
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, Site(f"{name}.attn2", place, level, True, heads), context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context, edit, res):
        x = x + self.attn1(self.norm1(x), edit=edit, res=res)
        x = x + self.attn2(self.norm2(x), context, edit=edit, res=res)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Feature map -> tokens -> transformer blocks -> feature map, with a residual. The projections
    in and out are 1x1 convs on the map (SD v1) or the same maps as Linear layers on the tokens (SD 2)."""

    def __init__(self, dim: int, cfg: UNetConfig, name: str, place: str, level: int):
        super().__init__()
        self.linear = cfg.linear_projection
        self.norm = nn.GroupNorm(cfg.groups, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim) if self.linear else nn.Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(dim, cfg.context_dim, cfg.heads_at(level), f"{name}.transformer_blocks.{i}", place,
                             level)
            for i in range(cfg.transformer_depth))
        self.proj_out = nn.Linear(dim, dim) if self.linear else nn.Conv2d(dim, dim, 1)

    def forward(self, x, context, edit):
        h, w = x.shape[-2:]
        if self.linear:
            y = self.proj_in(rearrange(self.norm(x), "b c h w -> b (h w) c"))
        else:
            y = rearrange(self.proj_in(self.norm(x)), "b c h w -> b (h w) c")
        for block in self.transformer_blocks:
            y = block(y, context, edit, (h, w))
        if self.linear:
            return x + rearrange(self.proj_out(y), "b (h w) c -> b c h w", h=h, w=w)
        return x + self.proj_out(rearrange(y, "b (h w) c -> b c h w", h=h, w=w))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest upsampling to `size`, that of the skip it meets next: twice x's size, less one where
    the stride-2 conv rounded an odd size up ((h, w) = (9, 25) goes down to (5, 13), and back)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, size: tuple[int, int]):
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class DownBlock(nn.Module):
    """One level of the encoder half; returns its output and the skips it leaves behind."""

    def __init__(self, cin: int, cout: int, level: int, cfg: UNetConfig, last: bool):
        super().__init__()
        temb = 4 * cfg.channels[0]
        n = cfg.layers_per_block
        self.resnets = nn.ModuleList(ResBlock(cin if j == 0 else cout, cout, temb, cfg.groups) for j in range(n))
        self.attentions = nn.ModuleList(
            SpatialTransformer(cout, cfg, f"down_blocks.{level}.attentions.{j}", "down", level)
            for j in range(n)) if cfg.attention[level] else None
        self.downsamplers = None if last else nn.ModuleList([Downsample(cout)])

    def forward(self, x, temb, context, edit):
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context, edit)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    def __init__(self, c: int, cfg: UNetConfig):
        super().__init__()
        temb, level = 4 * cfg.channels[0], len(cfg.channels) - 1
        self.resnets = nn.ModuleList([ResBlock(c, c, temb, cfg.groups), ResBlock(c, c, temb, cfg.groups)])
        self.attentions = nn.ModuleList([SpatialTransformer(c, cfg, "mid_block.attentions.0", "mid", level)])

    def forward(self, x, temb, context, edit):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context, edit)
        return self.resnets[1](x, temb)


class UpBlock(nn.Module):
    """One level of the decoder half; each resnet eats one skip (concatenated on channels)."""

    def __init__(self, index: int, cfg: UNetConfig):
        super().__init__()
        levels, n = len(cfg.channels), cfg.layers_per_block
        level = levels - 1 - index
        cout, cprev = cfg.channels[level], cfg.channels[min(level + 1, levels - 1)]
        cskip_last = cfg.channels[max(level - 1, 0)]   # the skip that left this level's input
        temb = 4 * cfg.channels[0]
        self.resnets = nn.ModuleList(
            ResBlock((cprev if j == 0 else cout) + (cskip_last if j == n else cout), cout, temb, cfg.groups)
            for j in range(n + 1))
        self.attentions = nn.ModuleList(
            SpatialTransformer(cout, cfg, f"up_blocks.{index}.attentions.{j}", "up", level)
            for j in range(n + 1)) if cfg.attention[level] else None
        self.upsamplers = nn.ModuleList([Upsample(cout)]) if level > 0 else None

    def forward(self, x, skips, temb, context, edit):
        for j, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context, edit)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, skips[-1].shape[-2:])
        return x


class UNet(nn.Module):
    """eps_theta(x_t, t, text): predicts the noise in latents x_t [b, 4, h, w] (v-prediction
    models, SD 2 at 768 px, predict v = sqrt(alpha_t) eps - sqrt(1 - alpha_t) x_0 instead)."""

    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        self.cfg = cfg
        ch, levels = cfg.channels, len(cfg.channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepMLP(ch[0], 4 * ch[0])
        self.down_blocks = nn.ModuleList(
            DownBlock(ch[max(i - 1, 0)], ch[i], i, cfg, last=i == levels - 1) for i in range(levels))
        self.mid_block = MidBlock(ch[-1], cfg)
        self.up_blocks = nn.ModuleList(UpBlock(i, cfg) for i in range(levels))
        self.conv_norm_out = nn.GroupNorm(cfg.groups, ch[0])
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def sites(self, h: int, w: int) -> list[Site]:
        """Every attention layer with the feature-map size (h, w) it sees for latents h high, w wide."""
        sizes = [(h, w)]
        for _ in self.cfg.channels[1:]:
            sizes.append(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2))   # stride-2 conv, padding 1
        return [replace(m.site, res=sizes[m.site.level]) for m in self.modules() if isinstance(m, Attention)]

    def forward(self, x, t, context, edit=None):
        """x [b, 4, h, w], t scalar or [b], context [b, 77, context_dim] -> eps [b, 4, h, w]."""
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        temb = self.time_embedding(timestep_embedding(t, self.cfg.channels[0]).to(x.dtype))
        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, s = block(x, temb, context, edit)
            skips += s
        x = self.mid_block(x, temb, context, edit)
        for block in self.up_blocks:
            x = block(x, skips, temb, context, edit)
        return self.conv_out(F.silu(self.conv_norm_out(x)))
