"""One attention module for the UNet's self- and cross-attention, with the edit seam.

Letters: b batch, n query tokens (h*w), m key tokens (n for self, 77 for cross),
heads, d head dim.
"""
from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


@dataclass(frozen=True)
class Site:
    """Where an attention layer sits: fixed at construction, plus the resolution at call time."""
    name: str            # checkpoint module path, e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    place: str           # "down", "mid" or "up"
    level: int           # resolution level: the layer runs at latent size / 2**level
    is_cross: bool       # keys come from the text (cross) or from the image itself (self)
    heads: int
    res: tuple[int, int] | None = None   # (h, w) of the feature map, filled in at call time


class Edit(Protocol):
    """What the UNet asks of an edit; p2p/ implements it (Prompt-to-Prompt lives there).

    `wants(site)`: does the edit touch this layer? If so, `fused(q, k, v, site)` may return the
    layer's output itself (an edit linear in the probabilities can act on q, k, v around fused
    attention); when it returns None, the probabilities are materialised and `__call__` edits them."""

    def wants(self, site: Site) -> bool: ...
    def fused(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, site: Site) -> torch.Tensor | None: ...
    def __call__(self, probs: torch.Tensor, site: Site) -> torch.Tensor: ...


class Attention(nn.Module):
    """Multi-head attention; hands q, k, v (or, if the edit asks, its probabilities) to `edit`
    when the edit wants this site."""

    def __init__(self, dim: int, site: Site, context_dim: int | None = None):
        super().__init__()
        self.site = site
        kv_dim = context_dim if site.is_cross else dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(kv_dim, dim, bias=False)
        self.to_v = nn.Linear(kv_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # index 0: names match checkpoints

    def forward(self, x, context=None, edit: Edit | None = None, res=None):
        source = context if self.site.is_cross else x
        q, k, v = (rearrange(t, "b n (heads d) -> b heads n d", heads=self.site.heads)
                   for t in (self.to_q(x), self.to_k(source), self.to_v(source)))
        site = replace(self.site, res=res) if edit is not None else None
        if site is None or not edit.wants(site):
            out = F.scaled_dot_product_attention(q, k, v)
        elif (out := edit.fused(q, k, v, site)) is None:
            # b heads n m, in float32 at least: SD 2.1's q.k overflows float16 (diffusers' upcast_attention).
            # Fused attention needs no such care: its CPU, flash and memory-efficient kernels accumulate
            # q.k in float32.
            up = torch.promote_types(q.dtype, torch.float32)
            scores = q.to(up) @ k.to(up).transpose(-1, -2) * q.shape[-1] ** -0.5
            probs = edit(scores.softmax(dim=-1).to(q.dtype), site)
            out = probs @ v
        return self.to_out[0](rearrange(out, "b heads n d -> b n (heads d)"))
