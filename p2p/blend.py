"""Stored attention maps, and the blends that read them after each sampler step.

The AttentionStore keeps the conditional half's maps (the edited ones, inside PromptToPrompt) summed
over steps; `maps` is the one place that averages them over steps and layers, for local blend, the
pictures (viz.py) and the edit-region metrics. LocalBlend keeps each target equal to the source
outside the edited words' attention; MaskBlend outside a region the user drew. Letters: b prompts,
heads, n = h*w query pixels, m keys (77 tokens for cross-attention).
"""
import torch
import torch.nn.functional as F
from einops import rearrange

from models import InputError
from models.attention import Site

from . import align
from .edits import MAX_TOKENS, picks, side
from .sampler import guidance_halves


class AttentionStore:
    """Sums over steps of the conditional half's attention maps (averaged over heads), per site.

    | items          | (place, side) layers, as the record names them (see edits.picks); () every layer |
    | res            | only layers whose short side is `res`; None any                                   |
    | cross          | keep cross-attention                                                              |
    | self_attention | keep self-attention                                                               |
    | steps          | [start, end) of the steps to keep; None all                                       |

    Used inside PromptToPrompt, or alone as the UNet's edit (it then changes nothing)."""

    def __init__(self, items=(), res: int | None = None, cross: bool = True, self_attention: bool = False,
                 steps: tuple[int, int] | None = None):
        self.items, self.res, self.cross, self.self_attention, self.window = items, res, cross, self_attention, steps
        self.sums, self.site_of, self.seen = {}, {}, set()   # per site name; the steps added
        self.step = 0   # set by the sampler when this is the edit itself

    def keeps(self, site: Site, step: int) -> bool:
        return ((self.cross if site.is_cross else self.self_attention) and picks(self.items, site)
                and (self.res is None or side(site) == self.res)
                and (self.window is None or self.window[0] <= step < self.window[1]))

    def wants(self, site: Site) -> bool:
        return self.keeps(site, self.step)

    def fused(self, q, k, v, site: Site):
        return None   # a store needs the probabilities

    def __call__(self, probs: torch.Tensor, site: Site) -> torch.Tensor:
        self.add(guidance_halves(probs)[1], site, self.step)
        return probs

    def add(self, probs: torch.Tensor, site: Site, step: int):   # probs [b, heads, n, m]
        maps = probs.float().mean(dim=1)
        self.sums[site.name] = self.sums[site.name] + maps if site.name in self.sums else maps
        self.site_of[site.name] = site
        self.seen.add(step)

    def maps(self, res: int, places=("down", "up"), cross: bool = True) -> torch.Tensor:
        """[b, h, w, m]: the maps of the layers in `places` whose short side is `res`, averaged over
        the steps stored and over those layers (m = 77 for cross-attention, h*w for self)."""
        kind = "cross" if cross else "self"
        names = [n for n, s in self.site_of.items() if s.is_cross == cross and side(s) == res and s.place in places]
        if not names:
            have = sorted({side(s) for s in self.site_of.values() if s.is_cross == cross}, reverse=True)
            raise InputError(f"no {kind}-attention maps stored at resolution {res} (stored: {have})")
        h = self.site_of[names[0]].res[0]
        return torch.stack([rearrange(self.sums[n] / len(self.seen), "b (h w) m -> b h w m", h=h)
                            for n in names]).mean(0)


class LocalBlend:
    """Keep the targets equal to the source outside the edited words' attention (after each step)."""

    def __init__(self, tokenizer, prompts: list[str], words: list[list[str]], threshold: float = 0.3,
                 res: int = 16, subtract: list[list[str]] | None = None, start: int = 0):
        if len(words) != len(prompts):
            raise InputError(f"local blend needs one word list per prompt ({len(prompts)}), got {len(words)}")
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

    def new_store(self) -> AttentionStore:
        """A store of just the maps the blend reads, so that every other layer stays fused."""
        return AttentionStore((("down", self.res), ("up", self.res)))

    def mask(self, maps: torch.Tensor, columns: torch.Tensor, size, pool: bool) -> torch.Tensor:
        # maps [b, h, w, m] -> boolean mask [b, 1, H, W] at latent size. The official code sums the maps
        # over steps where we average them: the division by the max below cancels that constant.
        m = (maps * columns.to(maps)[:, None, None, :]).sum(-1)[:, None]
        if pool:
            m = F.max_pool2d(m, 3, stride=1, padding=1)
        m = F.interpolate(m, size=size)
        mask = m / m.amax(dim=(2, 3), keepdim=True) > self.threshold
        return mask[:1] | mask                                    # union with the source's mask

    def __call__(self, x: torch.Tensor, store: AttentionStore, step: int) -> torch.Tensor:
        if step < self.start:
            return x
        maps = store.maps(self.res)                               # the down and up blocks (wants)
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

    def new_store(self) -> None:
        return None

    def __call__(self, x: torch.Tensor, store, step: int) -> torch.Tensor:
        if step < self.start:
            return x
        m = F.interpolate(self.region[None, None].float(), size=x.shape[2:], mode="area") > 0.5
        self.last_mask = m.expand(x.shape[0], -1, -1, -1)          # [b, 1, h, w]
        return x[:1] + self.last_mask.to(x) * (x - x[:1])
