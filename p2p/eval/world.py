"""A world of captioned shapes whose ground truth is known exactly: the data a baby Stable Diffusion
trains on, and the yardstick Prompt-to-Prompt's claims are measured against.

A scene is one or two flat-coloured shapes on a flat background, with a caption such as
"a red circle", "a red circle and a blue square" or "a small red circle and a big blue square on a
white background". Each object knows its mask and which caption words describe it. Positions are
never in the caption: as in real SD, layout has to come from the noise. Geometry is relative to
the side of the image, so one scene renders at any size with the same layout.

Words are split on " " as p2p aligns them, and every vocabulary word is one CLIP BPE token.
"""
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from models import InputError

from ..experiment import grid, output
from .pie import SIZE as PIE_SIZE, TYPES

PALETTE = {"red": (230, 25, 25), "green": (30, 170, 50), "blue": (30, 70, 230), "yellow": (245, 215, 30),
           "pink": (245, 120, 190), "purple": (140, 50, 190),
           "white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
COLOURS = ("red", "green", "blue", "yellow", "pink", "purple")   # no orange: "an" would make a swap two words
BACKGROUNDS = ("white", "black", "gray")     # apart from COLOURS, so an object never vanishes
SHAPES = ("circle", "square", "triangle")
# Radius of the circle each shape fits in (circle fills it, square and triangle have their corners
# on it), as a fraction of the side. Any small shape's area (circle: pi r^2 = 0.038) stays below any
# big one's (triangle: 1.3 r^2 = 0.052).
SIZES = {"small": 0.11, "big": 0.2}
MARGIN = 0.04                                # between objects, and from the image's edge
SUPERSAMPLE = 4                              # draw at 4x, average 4 x 4 blocks: antialiased edges
KINDS = ("colour", "shape", "size", "background")
# PIE-Bench has no size change. Its "change pose" (5) is the nearest: the same object, its outline
# changes in place, and the edit region is both outlines; "random" (0) would mix it with anything.
PIE_TYPE = {"colour": 6, "shape": 1, "size": 5, "background": 8}


@dataclass(frozen=True)
class Thing:
    """One object: its attributes, where it is (relative to the side) and its words in the caption."""
    shape: str
    colour: str
    size: str                  # "small" or "big", named in the caption or not
    centre: tuple[float, float]            # (x, y), 0..1 from the top left
    radius: float
    colour_word: int
    shape_word: int
    size_word: int | None      # None: the caption does not name the size

    @property
    def word_indices(self) -> tuple[int, ...]:
        return tuple(i for i in (self.size_word, self.colour_word, self.shape_word) if i is not None)


@dataclass(frozen=True)
class Scene:
    caption: str
    size: int                  # pixels of the side
    background: str
    objects: tuple[Thing, ...]
    background_word: int | None            # None: the caption does not name the background

    @property
    def words(self) -> list[str]:
        return self.caption.split(" ")


def fits(things) -> bool:
    """Every object inside the image and clear of the others, both by MARGIN."""
    inside = all(MARGIN + t.radius <= c <= 1 - MARGIN - t.radius for t in things for c in t.centre)
    apart = all(np.hypot(a.centre[0] - b.centre[0], a.centre[1] - b.centre[1]) >= a.radius + b.radius + MARGIN
                for i, a in enumerate(things) for b in things[i + 1:])
    return inside and apart


def scene(seed: int, index: int, size: int = 64) -> Scene:
    """Item `index` of `seed`: the same scene on every machine, from (seed, index) alone."""
    rng = np.random.default_rng([seed, index])
    n = int(rng.integers(1, 3))
    name_size, name_background = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
    background = str(rng.choice(BACKGROUNDS))
    colours = [str(c) for c in rng.choice(COLOURS, n, replace=False)]   # distinct: a colour word names one object
    shapes = [str(s) for s in rng.choice(SHAPES, n)]
    sizes = [str(s) for s in rng.choice(list(SIZES), n)]
    words, things = [], []
    for colour, shape, size_word in zip(colours, shapes, sizes):
        words += ["and"] * bool(words) + ["a"] + [size_word] * name_size
        named = len(words) - 1 if name_size else None
        words += [colour, shape]
        things.append(Thing(shape, colour, size_word, (0.0, 0.0), SIZES[size_word], len(words) - 2, len(words) - 1,
                            named))
    if name_background:
        words += ["on", "a", background, "background"]
    # positions: uniform inside the image, redrawn until the objects are clear of each other
    # (two big ones fit about one draw in nine: a thousand draws all fail with odds 1e-51)
    for _ in range(1000):
        placed = [replace(t, centre=tuple(float(c) for c in rng.uniform(MARGIN + t.radius, 1 - MARGIN - t.radius, 2)))
                  for t in things]
        if fits(placed):
            break
    else:
        raise RuntimeError(f"no layout found for item {index} of seed {seed}")
    return Scene(" ".join(words), size, background, tuple(placed), len(words) - 2 if name_background else None)


def draw(canvas: ImageDraw.ImageDraw, thing: Thing, side: int, fill):
    """One object on a `side`-pixel canvas: a circle fills its circle of radius r; the square's
    corners (at 45 degrees) and the triangle's (pointing up) lie on it."""
    x, y, r = thing.centre[0] * side, thing.centre[1] * side, thing.radius * side
    if thing.shape == "circle":
        canvas.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        return
    angles = {"square": (45, 135, 225, 315), "triangle": (-90, 30, 150)}[thing.shape]
    canvas.polygon([(x + r * np.cos(np.radians(a)), y + r * np.sin(np.radians(a))) for a in angles], fill=fill)


def render(scene: Scene, size: int | None = None) -> tuple[Image.Image, list[np.ndarray]]:
    """The scene's RGB image and each object's mask (bool [size, size], the pixels its shape covers
    by more than half), at `size` pixels (default the scene's own) with the same layout."""
    size = size or scene.size
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), PALETTE[scene.background])
    masks = []
    for thing in scene.objects:
        draw(ImageDraw.Draw(image), thing, big, PALETTE[thing.colour])
        alone = Image.new("1", (big, big), 0)
        draw(ImageDraw.Draw(alone), thing, big, 1)
        # drawn pixels per block, from the same drawing as the image's, so the mask is exact
        cover = np.asarray(alone, dtype=np.uint8).reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).sum(axis=(1, 3))
        masks.append(cover > SUPERSAMPLE ** 2 / 2)
    return image.reduce(SUPERSAMPLE), masks


def colour_masks(image) -> dict[str, np.ndarray]:
    """Each palette colour's pixels in an image: every pixel goes to its nearest palette colour.
    A generated image's objects are found this way (each colour names at most one object), so
    its ground truth is read off its own pixels; an antialiased edge may go to a third colour."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image).astype(float)
    palette = np.array(list(PALETTE.values()), dtype=float)
    nearest = ((pixels[..., None, :] - palette) ** 2).sum(-1).argmin(-1)
    return {name: nearest == i for i, name in enumerate(PALETTE)}


def read_colour(image, mask: np.ndarray) -> str:
    """The palette colour nearest the median pixel inside `mask` (the median ignores blended edges)."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)[mask]
    median = np.median(pixels.reshape(-1, 3).astype(float), axis=0)
    return min(PALETTE, key=lambda name: float(np.sum((median - PALETTE[name]) ** 2)))


def edit(scene: Scene, kind: str, rng: np.random.Generator) -> tuple[str, Scene, str, str]:
    """(target caption, target scene, source word, target word): the scene with one attribute of one
    object, or the background, changed, and its caption in exactly that word. The target scene is
    the ground truth of a perfect edit. A size or background edit needs a caption that names it."""
    if kind not in KINDS:
        raise InputError(f"edit kind: one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "background":
        if scene.background_word is None:
            raise InputError(f"a background edit needs a caption that names the background: {scene.caption!r}")
        new = str(rng.choice([b for b in BACKGROUNDS if b != scene.background]))
        return retell(replace(scene, background=new), scene.background_word, scene.background, new)
    if kind == "size":
        if scene.objects[0].size_word is None:
            raise InputError(f"a size edit needs a caption that names the sizes: {scene.caption!r}")
        flip = {"small": "big", "big": "small"}
        grown = [replace(t, size=flip[t.size], radius=SIZES[flip[t.size]]) for t in scene.objects]
        # only objects that still fit once resized, in place
        which = [i for i, t in enumerate(grown) if fits(scene.objects[:i] + (t,) + scene.objects[i + 1:])]
        if not which:
            raise InputError(f"no object of {scene.caption!r} has room to change its size")
        i = int(rng.choice(which))
        return retell(change(scene, i, grown[i]), scene.objects[i].size_word, scene.objects[i].size, grown[i].size)
    i = int(rng.integers(len(scene.objects)))
    thing = scene.objects[i]
    if kind == "colour":
        new = str(rng.choice([c for c in COLOURS if c not in {t.colour for t in scene.objects}]))
        return retell(change(scene, i, replace(thing, colour=new)), thing.colour_word, thing.colour, new)
    new = str(rng.choice([s for s in SHAPES if s != thing.shape]))
    return retell(change(scene, i, replace(thing, shape=new)), thing.shape_word, thing.shape, new)


def change(scene: Scene, i: int, thing: Thing) -> Scene:
    return replace(scene, objects=scene.objects[:i] + (thing,) + scene.objects[i + 1:])


def retell(target: Scene, word: int, old: str, new: str) -> tuple[str, Scene, str, str]:
    """The target scene with its caption's word `word` (the source's `old`) now `new`."""
    words = target.words
    words[word] = new
    caption = " ".join(words)
    return caption, replace(target, caption=caption), old, new


# ---- a PIE-Bench-format set ---------------------------------------------------------------

def rle(mask: np.ndarray) -> list[int]:
    """Run-length pairs [start, length, ...] of a boolean mask, row-major, as PIE-Bench stores them."""
    flat = np.concatenate([[0], mask.reshape(-1).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(flat))
    return [int(v) for start, end in zip(edges[::2], edges[1::2]) for v in (start, end - start)]


def edit_region(source: Scene, target: Scene, size: int) -> np.ndarray:
    """What a perfect edit changes: the edited object's source and target masks, or the background."""
    _, before = render(source, size)
    if source.background != target.background:
        return ~np.logical_or.reduce(before)
    _, after = render(target, size)
    i = next(i for i, (a, b) in enumerate(zip(source.objects, target.objects)) if a != b)
    return before[i] | after[i]


def bracket(caption: str, word: int) -> str:
    words = caption.split(" ")
    words[word] = f"[{words[word]}]"
    return " ".join(words)


def benchmark_edit(seed: int, index: int, kind: str, size: int = 64):
    """(source scene, target caption, target scene, source word, target word) of item `index` for the
    benchmark, or None where this kind of edit does not fit it, or a changed word would name two objects."""
    source = scene(seed, index, size)
    try:
        caption, target, old, new = edit(source, kind, np.random.default_rng([seed, index, 1]))
    except InputError:
        return None
    if source.words.count(old) > 1 or target.words.count(new) > 1:
        return None
    return source, caption, target, old, new


def write_pie(folder: Path, count: int, seed: int, size: int = PIE_SIZE) -> list[Path]:
    """A PIE-Bench-format folder of `count` edits, the kinds in turn: mapping_file.json and the
    source images (at `size` pixels) in annotation_images/; masks are on PIE-Bench's 512 grid.
    Returns the files written."""
    folder = Path(folder)
    if count < 1 or size < 8:
        raise InputError(f"count at least 1 and size at least 8 pixels, got {count} and {size}")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise InputError(f"{folder}: exists and is not an empty folder; a new set needs a new one")
    mapping, written, index = {}, [], -1
    for n in range(count):
        kind = KINDS[n % len(KINDS)]
        found = None
        while found is None:     # the next scene this kind of edit fits
            index += 1
            found = benchmark_edit(seed, index, kind, size)
        source, caption, target, old, new = found
        word = source.words.index(old)
        key = f"{PIE_TYPE[kind]}{n:011d}"       # 12 digits, the type first, as PIE-Bench numbers them
        path = f"{PIE_TYPE[kind]}_{TYPES[PIE_TYPE[kind]].replace(' ', '_')}/{key}.png"
        (folder / "annotation_images" / path).parent.mkdir(parents=True, exist_ok=True)
        output.save_image(folder / "annotation_images" / path, render(source)[0],
                          {"software": "p2p world", "world": json.dumps({"seed": seed, "index": index})})
        written.append(folder / "annotation_images" / path)
        mapping[key] = {"image_path": path, "original_prompt": bracket(source.caption, word),
                        "editing_prompt": bracket(caption, word), "editing_instruction": instruction(kind, old, new),
                        "editing_type_id": str(PIE_TYPE[kind]), "blended_word": f"{old} {new}",
                        "mask": rle(edit_region(source, target, PIE_SIZE)),
                        "world": {"seed": seed, "index": index, "kind": kind}}     # not PIE's: where it came from
    lines = ",\n".join(f"{json.dumps(key)}: {json.dumps(entry)}" for key, entry in mapping.items())   # an item a line
    grid.write_text(folder / "mapping_file.json", "{\n" + lines + "\n}\n")   # last: a set with a mapping is whole
    return [*written, folder / "mapping_file.json"]


def instruction(kind: str, old: str, new: str) -> str:
    return {"colour": f"Make the {old} object {new}", "shape": f"Make the {old} a {new}",
            "size": f"Make the {old} object {new}", "background": f"Make the background {new}"}[kind]
