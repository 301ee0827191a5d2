"""Pictures a person can look at: decoded images, labelled rows, and attention maps (one heatmap
per token over the generated image, self-attention components)."""
import functools

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageDraw, ImageFont

from .blend import AttentionStore

CELL = 160   # pixels on the long side of a tile
COMPONENTS_PER_ROW = 8  # so that `p2p maps --components 40` stays a readable width
GAP = 8  # pixels between images, and around the labels below them
FONT_SIZE = 15
MAX_LABEL_LINES = 3  # a longer label ends its third line in an ellipsis
# Fonts with wide coverage, by file name: ImageFont.truetype looks for them in the system font
# folders (XDG data dirs on Linux, Library/Fonts on macOS, %WINDIR%\fonts). Latin, Greek and
# Cyrillic first, then CJK ones. Pillow's own default font has ASCII only ("vélo" -> "v▯lo").
FONT_FILES = ("DejaVuSans.ttf", "NotoSans-Regular.ttf", "Arial.ttf", "arial.ttf",
              "NotoSansCJK-Regular.ttc", "Arial Unicode.ttf", "msyh.ttc", "wqy-microhei.ttc")
NO_GLYPH = "\uffff"  # a noncharacter: no font maps it, so it draws the font's missing-glyph box


def as_tensor(image) -> torch.Tensor:
    """to_pil's inverse, for measuring: a PIL image or an array [H, W, 3] of uint8 -> float64 [3, H, W] in [0, 1]; tensors pass."""
    if isinstance(image, torch.Tensor):
        return image.double()
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).double() / 255


def to_pil(images: torch.Tensor, truncate: bool = True) -> list[Image.Image]:
    """[b, 3, h, w] in [-1, 1], any dtype or device -> b PIL RGB images.

    8 bits as the official notebooks make them, (x / 2 + 0.5).clamp(0, 1) * 255 truncated, so a
    PNG compares pixel for pixel with theirs. `truncate=False` rounds instead, which gives an
    8-bit photo's own pixels back (truncation would lower a quarter of its values by one)."""
    # float32 at least; float64 stays float64, so [0, 1] metrics images round as they would unconverted
    pixels = (images.detach().cpu().to(torch.promote_types(images.dtype, torch.float32)) / 2 + 0.5).clamp(0, 1) * 255
    pixels = (pixels if truncate else pixels.round()).to(torch.uint8)   # float -> uint8 truncates
    return [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in pixels]  # [h, w, 3] each


# ---- labels -----------------------------------------------------------------------------

@functools.cache
def _fonts() -> list[ImageFont.ImageFont]:
    """The fonts of FONT_FILES this system has, loaded once; else Pillow's default font."""
    found = []
    for name in FONT_FILES:
        try:
            found.append(ImageFont.truetype(name, FONT_SIZE))
        except OSError:  # not installed
            pass
    if found:
        return found
    try:
        return [ImageFont.load_default(size=FONT_SIZE)]
    except TypeError:  # Pillow < 10.1 only has its small fixed-size bitmap font
        return [ImageFont.load_default()]


@functools.cache
def _mask(font: ImageFont.ImageFont, char: str) -> tuple:
    """How `font` draws `char` (size and pixels), to compare with its missing-glyph box."""
    m = font.getmask(char)
    return m.size, np.asarray(m).tobytes()


def _label_font(text: str) -> ImageFont.ImageFont:
    """The first font that draws every character of `text` (and the ellipsis), else the first font."""
    def has_glyphs(font):
        return all(c.isspace() or _mask(font, c) != _mask(font, NO_GLYPH) for c in set(text + "…"))

    return next((font for font in _fonts() if has_glyphs(font)), _fonts()[0])


def _wrap(text: str, font: ImageFont.ImageFont, width: int, max_lines: int = MAX_LABEL_LINES) -> list[str]:
    """Greedy word wrap to `width` pixels (a single word wider than that keeps its own line);
    past `max_lines` lines, the last one kept is cut to end in an ellipsis."""
    lines = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + "…") > width:
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last.rstrip() + "…"]
    return lines or [""]


def _layout(widths: list[int], labels: list[str]) -> tuple[list, list[list[str]], int]:
    """The fonts, wrapped lines and line height of a labelled row's labels."""
    fonts = [_label_font(label) for label in labels]
    wrapped = [_wrap(label, font, width) for width, label, font in zip(widths, labels, fonts, strict=True)]
    return fonts, wrapped, max(font.getbbox("Ag")[3] + 4 for font in fonts)


def row_size(sizes: list[tuple[int, int]], labels: list[str]) -> tuple[int, int]:
    """The (width, height) of labelled_row's image for images of these sizes, without drawing it."""
    _, wrapped, line_height = _layout([w for w, _ in sizes], labels)
    top = max(h for _, h in sizes) + GAP  # where the labels start
    return sum(w for w, _ in sizes) + GAP * (len(sizes) - 1), top + line_height * max(map(len, wrapped)) + GAP


def labelled_row(images: list[Image.Image], labels: list[str]) -> Image.Image:
    """The images side by side on white, each with its label centred below it."""
    fonts, wrapped, line_height = _layout([image.width for image in images], labels)
    top = max(image.height for image in images) + GAP  # where the labels start
    row = Image.new("RGB", row_size([image.size for image in images], labels), "white")
    draw = ImageDraw.Draw(row)
    x = 0
    for image, lines, font in zip(images, wrapped, fonts):
        row.paste(image.convert("RGB"), (x, 0))
        for i, line in enumerate(lines):
            draw.text((x + (image.width - font.getlength(line)) / 2, top + i * line_height), line, fill="black", font=font)
        x += image.width + GAP
    return row


def text_tile(text: str, size: tuple[int, int]) -> Image.Image:
    """A white tile of `size` with the text centred on it, wrapped to its width (a row's title)."""
    tile = Image.new("RGB", size, "white")
    font = _label_font(text)
    lines = _wrap(text, font, size[0] - 2 * GAP)
    height = font.getbbox("Ag")[3] + 4
    draw, top = ImageDraw.Draw(tile), (size[1] - height * len(lines)) / 2
    for i, line in enumerate(lines):
        draw.text(((size[0] - font.getlength(line)) / 2, top + i * height), line, fill="black", font=font)
    return tile


def token_maps(store: AttentionStore, res: int, places=("down", "up")) -> torch.Tensor:
    """Cross-attention maps at one resolution, averaged over steps, layers and heads: [b, h, w, 77]."""
    return store.maps(res, places)


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
    maps = store.maps(res, ("down", "mid", "up"), cross=False)[b].double()    # [h, w, n]
    h, w = maps.shape[:2]
    maps = rearrange(maps, "h w n -> (h w) n")
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
    return stack([labelled_row(parts[i:i + n], labels[i:i + n]) for i in range(0, len(parts), n)])


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
        rows.append(labelled_row(tiles, labels))
    return stack(rows)
