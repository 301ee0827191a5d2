"""Attention maps a person can look at: one heatmap per token, over the generated image."""
import numpy as np
import torch
from einops import rearrange
from PIL import Image

from models import InputError

from . import output
from .edits import AttentionStore, side

CELL = 160   # pixels on the long side of a tile
COMPONENTS_PER_ROW = 8  # so that `p2p maps --components 40` stays a readable width


def token_maps(store: AttentionStore, res: int, places=("down", "up")) -> torch.Tensor:
    """Cross-attention maps at one resolution, averaged over steps, layers and heads: [b, h, w, 77]."""
    names = [n for n, s in store.site_of.items() if s.is_cross and side(s) == res and s.place in places]
    if not names:
        have = sorted({side(s) for s in store.site_of.values() if s.is_cross}, reverse=True)
        raise InputError(f"no cross-attention maps stored at resolution {res} (stored: {have})")
    h = store.site_of[names[0]].res[0]
    return torch.stack([rearrange(store.average(n), "b (h w) m -> b h w m", h=h) for n in names]).mean(0)


def fit(width: int, height: int) -> tuple[int, int]:
    """A tile's (width, height): the long side CELL pixels, the aspect ratio kept."""
    scale = CELL / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def heat(image: Image.Image, attention: np.ndarray) -> Image.Image:
    """A [h, w] map scaled to 0..1 and laid over the image as a red-yellow heat overlay, the image's shape."""
    size = fit(*image.size)
    a = attention - attention.min()
    a = a / a.max() if a.max() > 0 else a
    a = np.asarray(Image.fromarray((a * 255).astype(np.uint8)).resize(size, Image.BILINEAR)) / 255.0
    base = np.asarray(image.convert("RGB").resize(size, Image.BILINEAR)) / 255.0
    hot = np.stack([np.clip(2 * a, 0, 1), np.clip(2 * a - 1, 0, 1), np.zeros_like(a)], axis=-1)
    return Image.fromarray((255 * (0.45 * base + 0.55 * hot)).astype(np.uint8))


def self_components(store: AttentionStore, res: int, count: int, b: int = 0) -> list[Image.Image]:
    """Top principal components of prompt b's self-attention at one resolution (the official
    notebook's view): rows of the pixel-by-pixel map, centred, through an SVD; grey images."""
    names = [n for n, s in store.site_of.items() if not s.is_cross and side(s) == res]
    if not names:
        raise InputError(f"no self-attention maps stored at resolution {res}")
    h, w = store.site_of[names[0]].res
    maps = torch.stack([store.average(n)[b] for n in names]).mean(0).double()    # [n, n]
    _, _, vh = torch.linalg.svd(maps - maps.mean(dim=1, keepdim=True))
    images = []
    for v in vh[:count]:
        a = v.reshape(h, w).numpy()
        a = (a - a.min()) / max(a.max() - a.min(), 1e-12)
        images.append(Image.fromarray((255 * a).astype(np.uint8)).convert("RGB").resize(fit(w, h)))
    return images


def stack(rows: list[Image.Image]) -> Image.Image:
    """Rows of images one under the other, left-aligned on white."""
    grid = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    y = 0
    for r in rows:
        grid.paste(r, (0, y))
        y += r.height
    return grid


def components_grid(parts: list[Image.Image]) -> Image.Image:
    """self_components' images, each labelled with its number, in rows of at most COMPONENTS_PER_ROW."""
    labels = [f"self-attention component {i + 1}" for i in range(len(parts))]
    n = COMPONENTS_PER_ROW
    return stack([output.labelled_row(parts[i:i + n], labels[i:i + n]) for i in range(0, len(parts), n)])


def token_maps_grid(images: list[Image.Image], prompts: list[str], store: AttentionStore, tokenizer,
                    res: int = 16) -> Image.Image:
    """One row per prompt: the image, then each of its tokens' maps labelled with the token."""
    maps = token_maps(store, res).cpu().numpy()
    rows = []
    for b, (image, prompt) in enumerate(zip(images, prompts)):
        tiles, labels = [image.resize(fit(*image.size), Image.BILINEAR)], [prompt]
        ids = tokenizer(prompt).input_ids
        for i in range(1, len(ids) - 1):   # the prompt's tokens, without start and end
            tiles.append(heat(image, maps[b, :, :, i]))
            labels.append(tokenizer.decode([ids[i]]))
        rows.append(output.labelled_row(tiles, labels))
    return stack(rows)
