"""A photo to edit: its inversion's settings, the inversion file to reuse or the one to make.

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
from dataclasses import dataclass
from pathlib import Path

import torch

from models import InputError

from .. import inversion, sampler
from ..eval import metrics
from ..inversion import Inversion


def check_settings(method: str, steps: int, size: int, size_flag: str = "--height and --width"):
    if size < inversion.MIN_SIZE:
        raise InputError(f"{size_flag} {size}: photos are edited at {inversion.MIN_SIZE} px or more")
    if method == "null-text" and steps > inversion.MAX_NULL_TEXT_STEPS:
        raise InputError(f"null-text inversion takes at most {inversion.MAX_NULL_TEXT_STEPS} steps (got {steps})")


def settings(image: Path, prompt: str, method: str, steps: int, guidance: float, inner_steps: int, size: int,
             offsets: tuple[int, int, int, int], weights_name: str, weights_fingerprint: str,
             prediction: str = "epsilon") -> dict[str, str]:
    """The inversion's metadata (inversion.SETTINGS, and the prediction the UNet's output was read
    as): what an inversion of this photo depends on."""
    return {"prompt": prompt, "method": method, "steps": str(steps), "guidance": str(guidance),
            "inner_steps": str(inner_steps) if method == "null-text" else "",
            "size": f"{size}x{size}", "checkpoint": weights_name, "checkpoint_fingerprint": weights_fingerprint,
            "offsets": ",".join(map(str, offsets)), "image": Path(image).name,
            "image_sha256": inversion.file_hash(image), "prediction": prediction}


def load(image: Path, want: dict[str, str]) -> torch.Tensor:
    """The photo as the model sees it: cropped by the settings' offsets, centre square, resized."""
    offsets = tuple(int(v) for v in want["offsets"].split(","))
    return inversion.load_image(image, int(want["size"].split("x")[0]), offsets)


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


def report(sd, inv: Inversion, z0_rec: torch.Tensor):
    """Print how far the reconstruction is from z0, and its PSNR against the VAE-only reconstruction."""
    mse = (z0_rec[:1].cpu() - inv.z0).square().mean().item()
    images = sampler.decode(sd, torch.cat([z0_rec[:1].cpu(), inv.z0]))     # [-1, 1], range 2
    psnr = metrics.psnr((images[0] + 1) / 2, (images[1] + 1) / 2)                # to [0, 1]
    print(f"reconstruction ({inv.settings['method']}, guidance {inv.settings['guidance']}): latent MSE {mse:.3e} "
          f"(z0 mean square {inv.z0.square().mean().item():.3f}), PSNR {psnr:.1f} dB against the VAE-only "
          f"reconstruction")


def report_latents(inv: Inversion, latents: torch.Tensor):
    """After an edit: how far its source row (the reconstruction) is from z0."""
    mse = (latents[:1].cpu() - inv.z0).square().mean().item()
    print(f"reconstruction (row 0, {inv.settings['method']}): latent MSE {mse:.3e}", file=sys.stderr)


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
        if key == "guidance" and inv.settings["method"] not in inversion.GUIDED:
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


def prepare(record, weights_name: str, weights_fingerprint: str, cache_dir: Path, prediction: str = "epsilon") -> Photo:
    """Before the model loads: the record's photo, and its inversion if there is one, checked
    against the weights (`record` is a p2p.record.Experiment with an image)."""
    if record.height != record.width:
        raise InputError(f"photos are edited square: width {record.width} and height {record.height} differ")
    want = settings(Path(record.image), record.source, record.method, record.steps, record.guidance,
                    record.inner_steps, record.height, record.offsets, weights_name, weights_fingerprint, prediction)
    if record.inversion is not None:
        inv = inversion.read(Path(record.inversion))
        check_match(Path(record.inversion), inv, want)
        return Photo(load(Path(record.image), inv.settings), want, inv, None, Path(record.inversion),
                     fixed_by(Path(record.inversion), inv, record))
    check_settings(record.method, record.steps, record.height)
    image = load(Path(record.image), want)
    cache = cache_path(Path(record.image), cache_dir, want)
    if not cache.exists():
        return Photo(image, want, None, cache)
    try:
        cached = inversion.read(cache)
    except InputError as e:
        raise InputError(f"the inversion cache file {cache} is in the way: it cannot be read as one ({e}); delete "
                         "it and the edit inverts the photo again (p2p never overwrites a file)") from None
    other = [k for k, v in want.items() if cached.settings.get(k) != v]
    if other:
        raise InputError(f"the inversion cache file {cache} is in the way: it holds an inversion with another "
                         f"{other[0]}; delete it and the edit inverts the photo again (p2p never overwrites a file)")
    print(f"reusing the inversion in {cache}", file=sys.stderr)
    return Photo(image, want, cached, None, cache)


def inversion_of(sd, photo: Photo, dtype: str) -> Inversion:
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
    if not all(torch.isfinite(t).all() for t in (inv.x_T, inv.z0, inv.null_embeddings, inv.trajectory) if t is not None):
        raise InputError(f"the inversion of {photo.path} came out nan or inf, so nothing was written (a guidance "
                         "too large, or weights holding nan or inf)")
    if photo.cache is None:
        return inv
    inversion.save(photo.cache, inv, {"dtype": dtype, "device": str(sd.device)})
    print(f"wrote {photo.cache} (the next edit of this photo with these settings reuses it)", file=sys.stderr)
    return inv
