"""Prompt-to-Prompt edits: attention callbacks for the UNet's `edit` seam (models/attention.py).

Batch = [source, target 1, ..., target k] (b = 1 + k prompts). The UNet runs the
classifier-free-guidance batch [unconditional b rows, conditional b rows]; only the
conditional half is edited unless asked. Letters: heads, n query pixels, m = 77 tokens.

A cross edit (Replace, Refine, Reweight) says what the targets' cross-attention should be,
E [k, heads, n, m], from the source's maps. `PromptToPrompt` owns the step windows, the
self-attention injection, the site filter, an optional AttentionStore and LocalBlend, and
mixes target <- alpha * E + (1 - alpha) * target inside the window, per token column.

Every one of these edits is linear in the probabilities, so where no store or blend needs the
maps they run around fused attention instead (PromptToPrompt.fused): injecting the source's
self-attention into a target is SDPA(Q_src, K_src, V_tgt), and a cross edit in the form
E = P_src L + P_tgt diag(d) (each cross edit's `linear()`) gives
out = SDPA(Q_src, K_src, L V_tgt) + SDPA(Q_tgt, K_tgt, diag(d) V_tgt).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

from models import InputError
from models.attention import Site

from . import align, check_finite

MAX_TOKENS = 77


# ---- which layers and steps an edit touches -------------------------------------------

def side(site: Site) -> int:
    """A site's resolution as one number: the short side of its feature map (16 for 16x16)."""
    return min(site.res)


def picks(items, site: Site) -> bool:
    """Whether a site is one of the (place, side) items: "any" matches every place or side, a
    side "@L" the resolution level L (see p2p.record.sites)."""
    return any(p in ("any", site.place) and (s in ("any", side(site)) or s == f"@{site.level}") for p, s in items)


@dataclass(frozen=True)
class Sites:
    """Filter for ablations: None means any. `steps` is a half-open range [start, end)."""
    places: tuple[str, ...] | None = None     # "down", "mid", "up"
    levels: tuple[int, ...] | None = None     # resolution level: latent size / 2**level
    resolutions: tuple[int, ...] | None = None  # short side of the feature map, e.g. (16,)
    cross: bool = True
    self: bool = True
    steps: tuple[int, int] | None = None
    items: tuple[tuple[str, int | str], ...] | None = None   # (place, side) pairs, as --cross-sites up:16

    def __call__(self, site: Site, step: int) -> bool:
        return ((self.cross if site.is_cross else self.self)
                and (self.places is None or site.place in self.places)
                and (self.levels is None or site.level in self.levels)
                and (self.resolutions is None or side(site) in self.resolutions)
                and (self.items is None or picks(self.items, site))
                and (self.steps is None or self.steps[0] <= step < self.steps[1]))


ALL = Sites()


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
            check_finite(f"the scale of {word!r}", c)
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
    start, end = (0.0, window) if isinstance(window, (int, float)) else window
    check_finite("a step window's start", start)
    check_finite("a step window's end", end)
    if not 0 <= start <= end <= 1:
        raise InputError(f"step window {window}: need 0 <= START <= END <= 1")
    return start, end


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


# ---- stored maps ------------------------------------------------------------------------

class AttentionStore:
    """Sums of the conditional half's attention maps (averaged over heads) per site, over steps.

    Used inside PromptToPrompt, or alone as the UNet's edit (it then changes nothing)."""

    def __init__(self, sites: Sites = Sites(self=False)):
        self.sites, self.sums, self.site_of, self.steps = sites, {}, {}, set()
        self.step = 0   # set by the sampler when this is the edit itself

    def wants(self, site: Site) -> bool:
        return self.sites(site, self.step)

    def fused(self, q, k, v, site: Site):
        return None   # a store needs the probabilities

    def __call__(self, probs: torch.Tensor, site: Site) -> torch.Tensor:
        self.add(probs[probs.shape[0] // 2:], site, self.step)   # the conditional half
        return probs

    def add(self, probs: torch.Tensor, site: Site, step: int):   # probs [b, heads, n, m]
        maps = probs.float().mean(dim=1)
        self.sums[site.name] = self.sums[site.name] + maps if site.name in self.sums else maps
        self.site_of[site.name] = site
        self.steps.add(step)

    def average(self, name: str) -> torch.Tensor:
        """Maps of one site averaged over the steps stored: [b, n, m]."""
        return self.sums[name] / len(self.steps)


class LocalBlend:
    """Keep the targets equal to the source outside the edited words' attention (after each step)."""

    def __init__(self, tokenizer, prompts: list[str], words: list[list[str]], threshold: float = 0.3,
                 res: int = 16, subtract: list[list[str]] | None = None, start: int = 0):
        if len(words) != len(prompts):
            raise InputError(f"local blend needs one word list per prompt ({len(prompts)}), got {len(words)}")
        check_finite("the local blend threshold", threshold)
        self.select = self.columns(tokenizer, prompts, words)
        self.subtract = self.columns(tokenizer, prompts, subtract) if subtract else None
        self.threshold, self.res, self.start = threshold, res, start
        self.last_mask = None

    @staticmethod
    def columns(tokenizer, prompts, words) -> torch.Tensor:
        chosen = torch.zeros(len(prompts), MAX_TOKENS)
        for b, (prompt, ws) in enumerate(zip(prompts, words)):
            for w in ws:
                chosen[b, align.token_indices(tokenizer, prompt, w)] = 1
        return chosen

    def wants(self, site: Site) -> bool:
        """The paper reads cross-attention at 16x16 (at 512 px) in the down and up blocks."""
        return site.is_cross and site.place != "mid" and side(site) == self.res

    def mask(self, maps: torch.Tensor, columns: torch.Tensor, size, pool: bool) -> torch.Tensor:
        # maps [layers, b, h, w, m] summed over steps -> boolean mask [b, 1, H, W] at latent size
        m = (maps.mean(0) * columns.to(maps)[:, None, None, :]).sum(-1)[:, None]
        if pool:
            m = F.max_pool2d(m, 3, stride=1, padding=1)
        m = F.interpolate(m, size=size)
        mask = m / m.amax(dim=(2, 3), keepdim=True) > self.threshold
        return mask[:1] | mask                                    # union with the source's mask

    def __call__(self, x: torch.Tensor, store: AttentionStore, step: int) -> torch.Tensor:
        if step < self.start:
            return x
        maps = torch.stack([rearrange(s, "b (h w) m -> b h w m", h=store.site_of[name].res[0])
                            for name, s in store.sums.items() if self.wants(store.site_of[name])])
        mask = self.mask(maps, self.select, x.shape[2:], pool=True)
        if self.subtract is not None:
            mask = mask & ~self.mask(maps, self.subtract, x.shape[2:], pool=False)
        self.last_mask = mask                                     # [b, 1, h, w]: the region metrics read
        return x[:1] + mask.to(x) * (x - x[:1])


class MaskBlend:
    """Local blending inside a region the user drew: mask [H, W] boolean (any size, resized to
    the latents by area, then > 0.5), the same for every target, from update `start` on."""

    def __init__(self, mask: torch.Tensor, start: int = 0):
        self.region, self.start, self.last_mask = mask.bool(), start, None

    def wants(self, site: Site) -> bool:
        return False   # no attention maps needed

    def __call__(self, x: torch.Tensor, store, step: int) -> torch.Tensor:
        if step < self.start:
            return x
        m = F.interpolate(self.region[None, None].float(), size=x.shape[2:], mode="area") > 0.5
        self.last_mask = m.expand(x.shape[0], -1, -1, -1)          # [b, 1, h, w]
        return x[:1] + self.last_mask.to(x) * (x - x[:1])


# ---- the edit handed to the UNet --------------------------------------------------------

class PromptToPrompt:
    """The callback: edits the targets' attention from the source's, inside the windows.

    | prompts         | [source, target 1, ..., target k]                                  |
    | cross           | Replace / Refine / Reweight, or None to leave cross-attention alone |
    | cross_steps     | fraction, (start, end) or {"default": .., word: ..} (see cross_alphas) |
    | self_steps      | fraction or (start, end) of steps with self-attention injection     |
    | self_max_tokens | inject only where the self-attention has at most this many keys     |
    | blend, store    | optional LocalBlend (or MaskBlend) and AttentionStore                |
    | sites           | Sites filter restricting where the edit acts (ablations)            |
    | cross_sites     | Sites filter for the cross edit alone, self_sites for the injection  |
    | edit_uncond     | also edit the unconditional half (off in the paper)                  |
    """

    def __init__(self, tokenizer, prompts: list[str], steps: int, cross=None, cross_steps=0.8,
                 self_steps=0.4, self_max_tokens: int = 256, blend: LocalBlend | None = None,
                 store: AttentionStore | None = None, sites: Sites = ALL, edit_uncond: bool = False,
                 cross_sites: Sites = ALL, self_sites: Sites = ALL):
        self.b, self.cross, self.sites, self.edit_uncond = len(prompts), cross, sites, edit_uncond
        self.cross_sites, self.self_sites = cross_sites, self_sites
        self.linear = cross.linear() if cross is not None else None   # (L, d): see fused()
        self.alphas = cross_alphas(tokenizer, prompts, steps, cross_steps)
        self.self_steps, self.self_max_tokens = self_window(steps, self_steps), self_max_tokens
        self.blend = blend
        # a store only for the blend keeps just the maps the blend reads, so every other layer stays fused
        self.store = store if store is not None or not isinstance(blend, LocalBlend) else \
            AttentionStore(Sites(places=("down", "up"), resolutions=(blend.res,), self=False))
        self.step = 0   # set by the sampler before each UNet call

    def edits(self, site: Site) -> bool:
        if not (self.sites(site, self.step) and (self.cross_sites if site.is_cross else self.self_sites)(site, self.step)):
            return False
        if site.is_cross:
            return self.cross is not None and bool(self.alphas[self.step].any())
        n = site.res[0] * site.res[1]
        return self.self_steps[0] <= self.step < self.self_steps[1] and n <= self.self_max_tokens

    def stores(self, site: Site) -> bool:
        return self.store is not None and (self.store.sites(site, self.step)
                                           or (self.blend is not None and self.blend.wants(site)))

    def wants(self, site: Site) -> bool:
        return self.edits(site) or self.stores(site)

    def fused(self, q, k, v, site: Site):
        """The layer's output [2b, heads, n, d] from q, k, v [2b, heads, n, d] around fused attention,
        or None where the maps must be materialised (a store or a blend reads them)."""
        if self.stores(site):
            return None
        out = F.scaled_dot_product_attention(q, k, v)
        if site.is_cross:   # this step's window mixed in: alpha E + (1 - alpha) P_tgt
            (mix, own), a = self.linear, self.alphas[self.step]             # [k, m, m], [k, m]; a [k, m]
            mix, own = (mix * a[:, None, :]).to(v), (own * a + 1 - a).to(v)
        halves = [self.b, 0] if self.edit_uncond else [self.b]   # row offsets of the halves to edit
        for h in halves:
            src, tgt = slice(h, h + 1), slice(h + 1, h + self.b)
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
            out = torch.cat([out[:h], new, out[h + self.b:]])
        return out

    def edit_half(self, probs, site):   # probs [b, heads, n, m] for [source, targets...]
        src, tgt = probs[0], probs[1:]
        if site.is_cross:
            a = self.alphas[self.step].to(probs)[:, None, None, :]
            new = self.cross(src, tgt) * a + tgt * (1 - a)
        else:
            new = src.expand_as(tgt)
        return torch.cat([src[None], new.to(probs.dtype)])

    def __call__(self, probs: torch.Tensor, site: Site) -> torch.Tensor:
        uncond, cond = probs[:self.b], probs[self.b:]
        if self.edits(site):
            cond = self.edit_half(cond, site)
            if self.edit_uncond:
                uncond = self.edit_half(uncond, site)
        if self.stores(site):
            self.store.add(cond, site, self.step)   # the edited maps, as the official store holds
        return torch.cat([uncond, cond])

    def after_step(self, step: int, x: torch.Tensor) -> torch.Tensor:
        return x if self.blend is None else self.blend(x, self.store, step)
