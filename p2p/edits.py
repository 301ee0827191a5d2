"""Prompt-to-Prompt edits: attention callbacks for the UNet's `edit` seam (models/attention.py).

Batch = [source, target 1, ..., target k] (b = 1 + k prompts). The UNet runs the
classifier-free-guidance batch of an unconditional and a conditional half of b rows each
(sampler.guidance_halves splits it); only the conditional half is edited unless asked.
Letters: heads, n query pixels, m = 77 tokens.

A cross edit (Replace, Refine, Reweight) says what the targets' cross-attention should be,
E [k, heads, n, m], from the source's maps. `PromptToPrompt` owns the step windows, the
self-attention injection, the layers each acts on, an optional AttentionStore and blend
(p2p/blend.py), and mixes target <- alpha * E + (1 - alpha) * target inside the window, per
token column. The values reaching here were checked where they entered (p2p/experiment/record.py);
only the words, which need the tokenizer, are checked here.

Every one of these edits is linear in the probabilities, so where no store or blend needs the
maps they run around fused attention instead (PromptToPrompt.fused): injecting the source's
self-attention into a target is SDPA(Q_src, K_src, V_tgt), and a cross edit in the form
E = P_src L + P_tgt diag(d) (each cross edit's `linear()`) gives
out = SDPA(Q_src, K_src, L V_tgt) + SDPA(Q_tgt, K_tgt, diag(d) V_tgt).
"""
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange

from models import InputError
from models.attention import Site

from . import align
from .sampler import guidance_batch, guidance_halves

MAX_TOKENS = 77


# ---- which layers and steps an edit touches -------------------------------------------

def side(site: Site) -> int:
    """A site's resolution as one number: the short side of its feature map (16 for 16x16)."""
    return min(site.res)


def picks(items, site: Site) -> bool:
    """Whether a site is one of the (place, side) items, the one way layers are named (the record's
    --cross-sites, --self-sites; see p2p.experiment.record.sites): "any" matches every place or
    side, a side "@L" the resolution level L; no items is every layer."""
    return not items or any(p in ("any", site.place) and (s in ("any", side(site)) or s == f"@{site.level}")
                            for p, s in items)


def every(site: Site) -> bool:
    """The site predicate that takes every layer."""
    return True


# ---- cross-attention edits: E from the source's maps ------------------------------------

class Replace:
    """Word swap: E = source maps through the 77x77 token mapper of each target (`official`: the
    authors' mapper, see align.replace_mapper)."""

    def __init__(self, tokenizer, prompts: list[str], official: bool = False):
        self.mappers = torch.stack([align.replace_mapper(tokenizer, prompts[0], p, official) for p in prompts[1:]])

    def __call__(self, src, tgt):   # src [heads, n, m], tgt [k, heads, n, m] -> [k, heads, n, m]
        return torch.einsum("hni,kij->khnj", src, self.mappers.to(src))

    def linear(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L [k, m, m], d [k, m]) with E = P_src L + P_tgt diag(d)."""
        return self.mappers, torch.zeros(self.mappers.shape[:2])


class Refine:
    """Added words: E = source columns gathered along the token alignment; new tokens keep their own."""

    def __init__(self, tokenizer, prompts: list[str]):
        maps = [align.refine_mapper(tokenizer, prompts[0], p) for p in prompts[1:]]
        self.index = torch.stack([m for m, _ in maps])           # [k, m]: source token per target token
        self.aligned = torch.stack([a for _, a in maps])         # [k, m]: 1 where a partner exists

    def __call__(self, src, tgt):
        gathered = torch.stack([src[..., i] for i in self.index.to(src.device)])   # [k, heads, n, m]
        a = self.aligned.to(src)[:, None, None, :]
        return gathered * a + tgt * (1 - a)

    def linear(self) -> tuple[torch.Tensor, torch.Tensor]:
        gather = F.one_hot(self.index, MAX_TOKENS).transpose(1, 2).float()   # [k, m, m]: source i -> target j
        return gather * self.aligned[:, None, :], 1 - self.aligned


class Reweight:
    """Scale chosen words' columns of E_prev (a Replace/Refine below it, else the source's maps)."""

    def __init__(self, tokenizer, prompts: list[str], scales: dict[str, float], prev=None):
        self.scale = torch.ones(len(prompts) - 1, MAX_TOKENS)
        for word, c in scales.items():
            targets = [k for k, p in enumerate(prompts[1:]) if word in p.split(" ")]
            if not targets:
                raise InputError(f"re-weighted word {word!r} is in no target prompt")
            for k in targets:
                self.scale[k, align.token_indices(tokenizer, prompts[1 + k], word)] = c
        self.prev = prev

    def __call__(self, src, tgt):
        e = self.prev(src, tgt) if self.prev is not None else src.expand_as(tgt)
        return e * self.scale.to(src)[:, None, None, :]

    def linear(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prev is None:
            return torch.diag_embed(self.scale), torch.zeros_like(self.scale)
        mix, own = self.prev.linear()
        return mix * self.scale[:, None, :], own * self.scale


# ---- the step windows -------------------------------------------------------------------

def bounds(window) -> tuple[float, float]:
    """A window as (start, end) fractions of the steps: F is (0, F)."""
    return (0.0, window) if isinstance(window, (int, float)) else window


def cross_alphas(tokenizer, prompts: list[str], steps: int, windows) -> torch.Tensor:
    """alpha [steps + 1, k, m]: 1 where target k's token column is edited at step i.

    `windows` is a fraction (edit the first part), a (start, end) pair, or a dict of those
    with a "default" entry and per-word entries. Like the official code, the table has
    steps + 1 rows, so a window (s, e) covers int(s*(steps+1)) <= i < int(e*(steps+1)); DDIM
    reads rows 0..N-1, PLMS (N + 1 UNet calls) all of them.
    """
    if not isinstance(windows, dict):
        windows = {"default": windows}
    windows = {"default": (0.0, 1.0), **windows}
    alpha = torch.zeros(steps + 1, len(prompts) - 1, MAX_TOKENS)

    def fill(window, k, columns):
        start, end = bounds(window)
        alpha[:, k, columns] = 0
        alpha[int(start * (steps + 1)):int(end * (steps + 1)), k, columns] = 1

    for k in range(len(prompts) - 1):
        fill(windows["default"], k, slice(None))
    for word, window in windows.items():
        if word == "default":
            continue
        found = [(k, align.token_indices(tokenizer, p, word)) for k, p in enumerate(prompts[1:]) if word in p.split(" ")]
        if not found:
            raise InputError(f"word {word!r} of a step window is in no target prompt")
        for k, columns in found:
            fill(window, k, columns)
    return alpha


def self_window(steps: int, window) -> tuple[int, int]:
    """Steps whose self-attention the targets take from the source: [int(s*N), int(e*N))."""
    start, end = bounds(window)
    return int(start * steps), int(end * steps)


# ---- the edit handed to the UNet --------------------------------------------------------

class PromptToPrompt:
    """The callback: edits the targets' attention from the source's, inside the windows.

    | prompts         | [source, target 1, ..., target k]                                  |
    | cross           | Replace / Refine / Reweight, or None to leave cross-attention alone |
    | cross_steps     | fraction, (start, end) or {"default": .., word: ..} (see cross_alphas) |
    | self_steps      | fraction or (start, end) of steps with self-attention injection     |
    | self_max_tokens | inject only where the self-attention has at most this many keys     |
    | blend, store    | optional blend.LocalBlend (or MaskBlend) and blend.AttentionStore    |
    | cross_sites     | which layers the cross edit acts on: a predicate of the Site, e.g.   |
    |                 | lambda s: picks(items, s); self_sites the same for the injection     |
    | edit_uncond     | also edit the unconditional half (off in the paper)                  |
    """

    def __init__(self, tokenizer, prompts: list[str], steps: int, cross=None, cross_steps=0.8,
                 self_steps=0.4, self_max_tokens: int = 256, blend=None, store=None, edit_uncond: bool = False,
                 cross_sites: Callable[[Site], bool] = every, self_sites: Callable[[Site], bool] = every):
        self.b, self.cross, self.edit_uncond = len(prompts), cross, edit_uncond
        self.cross_sites, self.self_sites = cross_sites, self_sites
        self.linear = cross.linear() if cross is not None else None   # (L, d): see fused()
        self.alphas = cross_alphas(tokenizer, prompts, steps, cross_steps)
        self.self_steps, self.self_max_tokens = self_window(steps, self_steps), self_max_tokens
        self.blend = blend
        self.store = store if store is not None or blend is None else blend.new_store()
        self.step = 0   # set by the sampler before each UNet call

    def edits(self, site: Site) -> bool:
        if not (self.cross_sites if site.is_cross else self.self_sites)(site):
            return False
        if site.is_cross:
            return self.cross is not None and bool(self.alphas[self.step].any())
        n = site.res[0] * site.res[1]
        return self.self_steps[0] <= self.step < self.self_steps[1] and n <= self.self_max_tokens

    def stores(self, site: Site) -> bool:
        return self.store is not None and (self.store.keeps(site, self.step)
                                           or (self.blend is not None and self.blend.wants(site)))

    def wants(self, site: Site) -> bool:
        return self.edits(site) or self.stores(site)

    def fused(self, q, k, v, site: Site):
        """The layer's output [2b, heads, n, d] from q, k, v [2b, heads, n, d] around fused attention,
        or None where the maps must be materialised (a store or a blend reads them)."""
        if self.stores(site):
            return None
        mix = own = None
        if site.is_cross:   # this step's window mixed in: alpha E + (1 - alpha) P_tgt
            (mix, own), a = self.linear, self.alphas[self.step]             # [k, m, m], [k, m]; a [k, m]
            mix, own = (mix * a[:, None, :]).to(v), (own * a + 1 - a).to(v)
        uncond, cond = guidance_halves(F.scaled_dot_product_attention(q, k, v))
        (q0, q1), (k0, k1), (v0, v1) = guidance_halves(q), guidance_halves(k), guidance_halves(v)
        cond = self.fused_half(q1, k1, v1, site, mix, own)
        if self.edit_uncond:
            uncond = self.fused_half(q0, k0, v0, site, mix, own)
        return guidance_batch(uncond, cond)

    def fused_half(self, q, k, v, site: Site, mix, own):
        """One half's output [b, heads, n, d] with the edit, from its q, k, v [b, heads, n, d]."""
        src, tgt = slice(0, 1), slice(1, self.b)
        # what the source's probabilities act on: its own values, for the source row, and per target
        # L V_tgt (cross) or V_tgt (the source's self-attention injected)
        theirs = torch.einsum("kij,khjd->khid", mix, v[tgt]) if site.is_cross else v[tgt]
        # One call for the source row and every target's share, the b value sets side by side along the
        # last dim: each comes out of the same kernel on the same query row, so a target equal to the
        # source is equal to it bit for bit. Separate calls, or rows of one batch, need not agree (CPU
        # SDPA on 1- and 2-pixel maps rounds a row by which thread's share it falls in, by ~1e-7 that
        # sampling grows to 1e-4). Values wider than q send CPU SDPA to its math kernel (the source's
        # maps materialised, n x m per head); CUDA's memory-efficient kernel accepts them.
        values = rearrange(torch.cat([v[src], theirs]), "b heads m d -> 1 heads m (b d)")
        new = rearrange(F.scaled_dot_product_attention(q[src], k[src], values),
                        "1 heads n (b d) -> b heads n d", b=self.b)
        if site.is_cross:   # + SDPA(Q_tgt, K_tgt, diag(d) V_tgt)
            new = torch.cat([new[:1], new[1:] + F.scaled_dot_product_attention(
                q[tgt], k[tgt], own[:, None, :, None] * v[tgt])])
        return new

    def edit_half(self, probs, site):   # probs [b, heads, n, m] for [source, targets...]
        src, tgt = probs[0], probs[1:]
        if site.is_cross:
            a = self.alphas[self.step].to(probs)[:, None, None, :]
            new = self.cross(src, tgt) * a + tgt * (1 - a)
        else:
            new = src.expand_as(tgt)
        return torch.cat([src[None], new.to(probs.dtype)])

    def __call__(self, probs: torch.Tensor, site: Site) -> torch.Tensor:
        uncond, cond = guidance_halves(probs)
        if self.edits(site):
            cond = self.edit_half(cond, site)
            if self.edit_uncond:
                uncond = self.edit_half(uncond, site)
        if self.stores(site):
            self.store.add(cond, site, self.step)   # the edited maps, as the official store holds
        return guidance_batch(uncond, cond)

    def after_step(self, step: int, x: torch.Tensor) -> torch.Tensor:
        return x if self.blend is None else self.blend(x, self.store, step)
