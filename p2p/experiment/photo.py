"""A photo to edit: reading it, the inversion file (its tensors and the settings they were made
with), the file to reuse or the one to make. The maths of inversion is p2p/inversion.py's.

An edit of a photo starts from an inversion: one given as `inversion` must have been made for
the same prompt, photo, size, steps (and guidance, for null-text) and weights (their
fingerprint), and it fixes the method, inner steps and offsets; without one, the edit inverts
first and keeps the result in a cache folder (next to its output, for the CLI) as
PHOTO.KEY.inversion.safetensors, KEY a hash of every setting, reused by the next edit with the
same settings. A file of that name that is not such an
inversion is never overwritten. Everything up to `prepare` runs without the model.
"""
import dataclasses
import hashlib
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors import SafetensorError, safe_open

from models import InputError

from .. import check_finite, inversion, sampler
from .output import save_tensors

MIN_SIZE = 64          # 8x8 latents: the UNet's three stride-2 convs take them down to 1x1
MAX_NULL_TEXT_STEPS = 100   # its learning rate 1e-2 * (1 - i/100) reaches 0 at outer step 100 (inversion.py)
GUIDED = ("null-text",)   # methods whose tensors hold only at the guidance they were made for


# ---- the photo -------------------------------------------------------------------------

def open_image(path: Path, what: str) -> Image.Image:
    """The image file, read whole, or a one-line error naming it as `what` (e.g. "blend mask PATH").
    Past Pillow's MAX_IMAGE_PIXELS (89 million) it warns and past twice that it raises: either way
    the file claims more pixels than a photo to edit needs, as a decompression bomb does."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
            return image
    except FileNotFoundError:
        raise InputError(f"{what} does not exist") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{what} is too large to read: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"cannot read {what} as an image ({e})") from None


def load_image(path: Path, size: int, offsets=(0, 0, 0, 0)) -> torch.Tensor:
    """Read, crop `offsets` (left, right, top, bottom) pixels off, centre-crop to a square and
    resize: [1, 3, size, size] in [-1, 1]. Unlike the official notebook, offsets are not clamped."""
    image = ImageOps.exif_transpose(open_image(path, str(path)))   # phone photos are stored rotated
    if image.mode.startswith("I"):   # 16-bit greyscale: convert("RGB") would clip it to white
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    image = image.convert("RGB")     # greyscale, palette, CMYK; RGBA loses its alpha, as the official [:, :, :3]
    w, h = image.size
    left, right, top, bottom = offsets
    if min(offsets) < 0 or left + right >= w or top + bottom >= h:
        raise InputError(f"offsets {left},{right},{top},{bottom} do not fit the {w}x{h} image {path}")
    w, h = w - left - right, h - top - bottom
    side = min(w, h)
    if side < MIN_SIZE:
        raise InputError(f"{path} is too small: {w}x{h} pixels after the offsets, "
                         f"at least {MIN_SIZE}x{MIN_SIZE} are needed")
    x0, y0 = left + (w - side) // 2, top + (h - side) // 2      # the centre square, as load_512 takes it
    image = image.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image).copy()).float() / 127.5 - 1
    return rearrange(pixels, "h w c -> 1 c h w")


def file_hash(path: Path) -> str:
    """sha256 of the photo's bytes: an inversion file remembers which photo it inverts."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except FileNotFoundError:
        raise InputError(f"{path} does not exist") from None
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None


# ---- the inversion file ------------------------------------------------------------------

@dataclass
class Inversion:
    """An inverted photo: the tensors and, as strings, what they were made from (see SETTINGS)."""
    x_T: torch.Tensor                      # [1, 4, h, w]
    z0: torch.Tensor                       # [1, 4, h, w]
    null_embeddings: torch.Tensor | None   # [steps, m, D]; None for "ddim" and "direct" (the "" embedding)
    trajectory: torch.Tensor | None        # [steps, 4, h, w], the source row after each step; "direct" only
    settings: dict[str, str]

    def start(self) -> dict:
        """sampler.generate's keyword arguments that sample from this inversion."""
        return {"x_T": self.x_T, "null_embeddings": self.null_embeddings, "source_trajectory": self.trajectory}


# what an inversion depends on; a cached one is reused only when every entry matches
SETTINGS = ("prompt", "method", "steps", "guidance", "inner_steps", "size", "checkpoint",
            "checkpoint_fingerprint", "offsets", "image", "image_sha256", "prediction")


def save(path: Path, inv: Inversion, extra: dict[str, str] | None = None):
    """Write the inversion file; `extra` metadata (dtype, device) is recorded but never matched."""
    tensors = {"x_T": inv.x_T, "z0": inv.z0, "null_embeddings": inv.null_embeddings,
               "trajectory": inv.trajectory}
    tensors = {k: v for k, v in tensors.items() if v is not None}
    save_tensors(path, tensors, {**(extra or {}), **inv.settings, "software": "p2p invert"})


def read(path: Path) -> Inversion:
    """Read an inversion file, refusing anything that is not one (one-line errors)."""
    if not Path(path).is_file():
        raise InputError(f"inversion file {path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            settings, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"cannot read {path} as a safetensors file ({e})") from None
    needs = {"ddim": (), "direct": ("trajectory",)}.get(settings.get("method"), ("null_embeddings",))
    missing = [k for k in SETTINGS if k not in settings] + [k for k in ("x_T", "z0", *needs) if k not in tensors]
    if missing:
        raise InputError(f"{path} is not a p2p inversion file (it lacks {missing[0]})")
    steps, size = int(settings["steps"]), int(settings["size"].split("x")[0])
    latent = (4, size // 8, size // 8)
    null, pins = tensors.get("null_embeddings"), tensors.get("trajectory")
    if (tensors["x_T"].shape != (1, *latent) or (null is not None and null.shape[0] != steps)
            or (pins is not None and pins.shape != (steps, *latent))):
        raise InputError(f"{path}: tensor shapes do not match its {settings['size']} px, {steps}-step metadata")
    return Inversion(tensors["x_T"], tensors["z0"], null, pins, settings)


# ---- an inversion's settings ---------------------------------------------------------------

def check_settings(method: str, steps: int, size: int, size_flag: str = "--height and --width"):
    if size < MIN_SIZE:
        raise InputError(f"{size_flag} {size}: photos are edited at {MIN_SIZE} px or more")
    if method == "null-text" and steps > MAX_NULL_TEXT_STEPS:
        raise InputError(f"null-text inversion takes at most {MAX_NULL_TEXT_STEPS} steps (got {steps})")


def settings(image: Path, prompt: str, method: str, steps: int, guidance: float, inner_steps: int, size: int,
             offsets: tuple[int, int, int, int], weights_name: str, weights_fingerprint: str,
             prediction: str = "epsilon") -> dict[str, str]:
    """The inversion's metadata (SETTINGS, the prediction the UNet's output was read as among them):
    what an inversion of this photo depends on."""
    return {"prompt": prompt, "method": method, "steps": str(steps), "guidance": str(guidance),
            "inner_steps": str(inner_steps) if method == "null-text" else "",
            "size": f"{size}x{size}", "checkpoint": weights_name, "checkpoint_fingerprint": weights_fingerprint,
            "offsets": ",".join(map(str, offsets)), "image": Path(image).name,
            "image_sha256": file_hash(image), "prediction": prediction}


def load(image: Path, want: dict[str, str]) -> torch.Tensor:
    """The photo as the model sees it: cropped by the settings' offsets, centre square, resized."""
    offsets = tuple(int(v) for v in want["offsets"].split(","))
    return load_image(image, int(want["size"].split("x")[0]), offsets)


def invert(sd, image: torch.Tensor, want: dict[str, str]) -> Inversion:
    """Invert the photo for the settings `want` (see settings())."""
    z0 = inversion.encode(sd, image)
    x_T, null, offsets = inversion.invert(sd, z0, want["prompt"], want["method"], int(want["steps"]),
                                          float(want["guidance"]), int(want["inner_steps"] or 0))
    return Inversion(x_T, z0, null, offsets, want)


def reconstruct(sd, inv: Inversion) -> torch.Tensor:
    """Sample the source prompt from the inversion, no edit: z0 again, as well as the inversion is good."""
    size, s = int(inv.settings["size"].split("x")[0]), inv.settings
    return sampler.generate(sd, [s["prompt"]], steps=int(s["steps"]), guidance=float(s["guidance"]),
                            height=size, width=size, **inv.start())


# ---- the photo of an edit -----------------------------------------------------------------

HINTS = {"prompt": "the source must be the prompt the photo was inverted with",
         "size": "edit at the size it was inverted at (height, width)",
         "steps": "edit with the steps it was inverted with",
         "guidance": "null-text embeddings and direct offsets only reconstruct at the guidance they were made for",
         "checkpoint_fingerprint": "an inversion only holds for the weights that made it",
         "prediction": "the UNet's output must be read as it was when inverting (--prediction)"}


def check_match(path: Path, inv: Inversion, want: dict[str, str]):
    """One-line error at the first setting of `inv` that differs from `want`."""
    if inv.settings["image_sha256"] != want["image_sha256"]:
        raise InputError(f"{path} inverts another photo ({inv.settings['image']}), not {want['image']}")
    if inv.settings["checkpoint_fingerprint"] != want["checkpoint_fingerprint"]:
        raise InputError(f"{path} was made with other weights ({inv.settings['checkpoint']}, fingerprint "
                         f"{inv.settings['checkpoint_fingerprint']}) than {want['checkpoint']} (fingerprint "
                         f"{want['checkpoint_fingerprint']}): {HINTS['checkpoint_fingerprint']}")
    for key in ("prompt", "size", "steps", "guidance", "prediction"):
        if key == "guidance" and inv.settings["method"] not in GUIDED:
            continue
        if inv.settings[key] != want[key]:
            raise InputError(f"{path} was made with {key} {inv.settings[key]!r}, not {want[key]!r}: {HINTS[key]}")


def cache_path(image: Path, cache_dir: Path, want: dict[str, str]) -> Path:
    """Where an edit keeps the inversion it makes, named by a hash of its settings, so a file
    the user wrote and another caption's inversion are never overwritten."""
    key = hashlib.sha256(json.dumps(want, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{Path(image).stem}.{key}.inversion.safetensors"


@dataclass
class Photo:
    image: torch.Tensor             # [1, 3, size, size] in [-1, 1], as the model sees it
    settings: dict[str, str]        # what its inversion must be made with
    inversion: Inversion | None     # the given inversion or the matching cached one; None: invert
    cache: Path | None              # where a new inversion is written
    path: Path | None = None        # the given inversion's file, for messages
    fixed: dict = dataclasses.field(default_factory=dict)   # the record fields the given file fixes


FIXED = {"method": "--method", "inner_steps": "--inner-steps", "offsets": "--offsets"}


def fixed_by(path: Path, inv: Inversion, record) -> dict:
    """The record fields an inversion file fixes ({field: its value}). The file's settings replace
    the record's defaults, so the record (and every output's metadata) says what was run; a value
    the user chose that differs from the file's is refused, as an edit with it cannot be run."""
    s = inv.settings
    fixed = {"method": s["method"], "offsets": tuple(int(v) for v in s["offsets"].split(","))}
    if s["method"] == "null-text":
        fixed["inner_steps"] = int(s["inner_steps"])
    default = type(record)(record.source, record.targets, record.mode)
    text = lambda v: ",".join(map(str, v)) if isinstance(v, tuple) else str(v)
    for field, value in fixed.items():
        chosen = getattr(record, field)
        if chosen != value and chosen != getattr(default, field):
            raise InputError(f"{FIXED[field]} {text(chosen)}: the inversion {path} was made with "
                             f"{field.replace('_', ' ')} {text(value)}; the file fixes it, so leave {FIXED[field]} "
                             "out, or invert again without --inversion")
    return fixed


def prepare(record, weights_name: str, weights_fingerprint: str, cache_dir: Path | None,
            prediction: str = "epsilon") -> Photo:
    """Before the model loads: the record's photo, and its inversion if there is one, checked
    against the weights (`record`: an Experiment with an image); a new inversion is to be kept in
    `cache_dir` (None: not kept), where an earlier one is reused."""
    if record.height != record.width:
        raise InputError(f"photos are edited square: width {record.width} and height {record.height} differ")
    want = settings(Path(record.image), record.source, record.method, record.steps, record.guidance,
                    record.inner_steps, record.height, record.offsets, weights_name, weights_fingerprint, prediction)
    if record.inversion is not None:
        inv = read(Path(record.inversion))
        check_match(Path(record.inversion), inv, want)
        return Photo(load(Path(record.image), inv.settings), want, inv, None, Path(record.inversion),
                     fixed_by(Path(record.inversion), inv, record))
    check_settings(record.method, record.steps, record.height)
    image = load(Path(record.image), want)
    cache = cache_path(Path(record.image), cache_dir, want) if cache_dir is not None else None
    if cache is None or not cache.exists():
        return Photo(image, want, None, cache)
    try:
        cached = read(cache)
    except InputError as e:
        raise InputError(f"the inversion cache file {cache} is in the way: it cannot be read as one ({e}); delete "
                         "it and the edit inverts the photo again (p2p never overwrites a file)") from None
    other = [k for k, v in want.items() if cached.settings.get(k) != v]
    if other:
        raise InputError(f"the inversion cache file {cache} is in the way: it holds an inversion with another "
                         f"{other[0]}; delete it and the edit inverts the photo again (p2p never overwrites a file)")
    print(f"reusing the inversion in {cache}", file=sys.stderr)
    return Photo(image, want, cached, None, cache)


def inversion_of(sd, photo: Photo) -> Inversion:
    """The given or cached inversion (checked against the model), or a new one, saved in the cache
    (not kept where the photo's cache is None)."""
    inv = photo.inversion
    if inv is not None:
        if inv.null_embeddings is not None and inv.null_embeddings.shape[-1] != sd.unet.cfg.context_dim:
            raise InputError(f"{photo.path}: its null embeddings are {inv.null_embeddings.shape[-1]} wide, "
                             f"this model's text is {sd.unet.cfg.context_dim}")
        return inv
    inv = invert(sd, photo.image, photo.settings)
    # nan or inf is refused before the cache keeps it, or every later edit of the photo would reuse it
    check_finite(f"the inversion of {photo.settings['image']}", inv.x_T, inv.z0, inv.null_embeddings, inv.trajectory)
    if photo.cache is None:
        return inv
    save(photo.cache, inv, {"dtype": str(sd.dtype).removeprefix("torch."), "device": str(sd.device)})
    print(f"wrote {photo.cache} (the next edit of this photo with these settings reuses it)", file=sys.stderr)
    return inv
