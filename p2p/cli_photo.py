"""The photo half of the `p2p` command: `p2p invert`, and `p2p edit --image` (commands.py calls these).

An edit of a photo starts from an inversion: one given with --inversion must have been made
for the same prompt, photo, size, steps (and guidance, for null-text) and weights (their
fingerprint); without one, the edit inverts first and keeps the result next to its output as
PHOTO.KEY.inversion.safetensors, KEY a hash of every setting, reused by the next edit with the
same settings. A file of that name that is not such an inversion is never overwritten.
"""
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from models import InputError
from models.checkpoint import fingerprint

from . import inversion, sampler
from .inversion import Inversion


def offsets(text: str) -> tuple[int, int, int, int]:
    """"L,R,T,B" -> pixels cropped off each side, as the official notebook's load_512 takes them."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or min(values) < 0:
        raise InputError(f"--offsets takes LEFT,RIGHT,TOP,BOTTOM pixel counts >= 0, got {text!r}")
    return values


def check_settings(method: str, steps: int, size: int):
    if size < inversion.MIN_SIZE:
        raise InputError(f"photos are edited at {inversion.MIN_SIZE} px or more (got {size})")
    if method == "null-text" and steps > inversion.MAX_NULL_TEXT_STEPS:
        raise InputError(f"null-text inversion takes at most {inversion.MAX_NULL_TEXT_STEPS} steps (got {steps})")


def settings(args, prompt: str, size: int, weights: Path, weights_fingerprint: str,
             image_sha256: str) -> dict[str, str]:
    """The inversion's metadata (inversion.SETTINGS) for these flags."""
    return {"prompt": prompt, "method": args.method, "steps": str(args.steps), "guidance": str(args.guidance),
            "inner_steps": str(args.inner_steps) if args.method == "null-text" else "",
            "size": f"{size}x{size}", "checkpoint": Path(weights).name,
            "checkpoint_fingerprint": weights_fingerprint, "offsets": ",".join(map(str, offsets(args.offsets))),
            "image": args.image.name, "image_sha256": image_sha256}


def load_photo(args, size: int, crop: str | None = None) -> torch.Tensor:
    return inversion.load_image(args.image, size, offsets(crop or args.offsets))


def invert_photo(sd, args, image: torch.Tensor, want: dict[str, str]) -> Inversion:
    """Invert the photo for the settings `want` (see settings())."""
    z0 = inversion.encode(sd, image)
    x_T, null = inversion.invert(sd, z0, want["prompt"], args.method, args.steps, args.guidance, args.inner_steps)
    return Inversion(x_T, z0, null, want)


def reconstruct(sd, inv: Inversion) -> torch.Tensor:
    """Sample the source prompt from the inversion, no edit: z0 again, as well as the inversion is good."""
    size, s = int(inv.settings["size"].split("x")[0]), inv.settings
    return sampler.generate(sd, [s["prompt"]], steps=int(s["steps"]), guidance=float(s["guidance"]),
                            height=size, width=size, x_T=inv.x_T, null_embeddings=inv.null_embeddings)


def report(sd, inv: Inversion, z0_rec: torch.Tensor):
    """Print how far the reconstruction is from z0, and its PSNR against the VAE-only reconstruction."""
    mse = (z0_rec[:1].cpu() - inv.z0).square().mean().item()
    images = sampler.decode(sd, torch.cat([z0_rec[:1].cpu(), inv.z0]))     # [-1, 1], range 2
    psnr = 10 * torch.log10(4 / (images[0] - images[1]).square().mean()).item()
    print(f"reconstruction ({inv.settings['method']}, guidance {inv.settings['guidance']}): latent MSE {mse:.3e} "
          f"(z0 mean square {inv.z0.square().mean().item():.3f}), PSNR {psnr:.1f} dB against the VAE-only "
          f"reconstruction")


def report_latents(inv: Inversion, latents: torch.Tensor):
    """After an edit: how far its source row (the reconstruction) is from z0."""
    mse = (latents[:1].cpu() - inv.z0).square().mean().item()
    print(f"reconstruction (row 0, {inv.settings['method']}): latent MSE {mse:.3e}", file=sys.stderr)


# ---- p2p edit --image -------------------------------------------------------------------

HINTS = {"prompt": "--source must be the prompt the photo was inverted with",
         "size": "edit at the size it was inverted at (--height, --width)",
         "steps": "edit with the steps it was inverted with",
         "guidance": "null-text embeddings only reconstruct at the guidance they were optimised for",
         "checkpoint_fingerprint": "an inversion only holds for the weights that made it"}


def check_match(path: Path, inv: Inversion, want: dict[str, str]):
    """One-line error at the first setting of `inv` that differs from `want`."""
    if inv.settings["image_sha256"] != want["image_sha256"]:
        raise InputError(f"{path} inverts another photo ({inv.settings['image']}), not {want['image']}")
    if inv.settings["checkpoint_fingerprint"] != want["checkpoint_fingerprint"]:
        raise InputError(f"{path} was made with other weights ({inv.settings['checkpoint']}, fingerprint "
                         f"{inv.settings['checkpoint_fingerprint']}) than {want['checkpoint']} (fingerprint "
                         f"{want['checkpoint_fingerprint']}): {HINTS['checkpoint_fingerprint']}")
    for key in ("prompt", "size", "steps", "guidance"):
        if key == "guidance" and inv.settings["method"] != "null-text":
            continue
        if inv.settings[key] != want[key]:
            raise InputError(f"{path} was made with {key} {inv.settings[key]!r}, not {want[key]!r}: {HINTS[key]}")


def cache_path(args, want: dict[str, str]) -> Path:
    """Where `p2p edit --image` keeps the inversion it makes: beside --out, named by a hash of
    its settings, so a file the user wrote and another caption's inversion are never overwritten."""
    key = hashlib.sha256(json.dumps(want, sort_keys=True).encode()).hexdigest()[:12]
    return args.out.parent / f"{args.image.stem}.{key}.inversion.safetensors"


@dataclass
class Photo:
    image: torch.Tensor             # [1, 3, size, size] in [-1, 1], as the model sees it
    settings: dict[str, str]        # what its inversion must be made with
    inversion: Inversion | None     # the --inversion file or the matching cached one; None: invert
    cache: Path | None              # where a new inversion is written


def prepare(args) -> Photo:
    """Before the model loads: the photo, and its inversion if there is one, checked against the weights."""
    if args.height != args.width:
        raise InputError(f"photos are edited square: --width {args.width} and --height {args.height} differ")
    weights, photo_hash = fingerprint(args.weights), inversion.file_hash(args.image)
    want = settings(args, args.source, args.height, args.weights, weights, photo_hash)
    if args.inversion is not None:
        inv = inversion.read(args.inversion)
        image = load_photo(args, args.height, inv.settings["offsets"])   # cropped as it was inverted
        check_match(args.inversion, inv, want)
        return Photo(image, want, inv, None)
    check_settings(args.method, args.steps, args.height)
    image = load_photo(args, args.height)
    cache = cache_path(args, want)
    if not cache.exists():
        return Photo(image, want, None, cache)
    try:
        cached = inversion.read(cache)
    except InputError:
        cached = None
    if cached is None or any(cached.settings.get(k) != v for k, v in want.items()):
        raise InputError(f"{cache} is in the way: it is not the inversion of these settings; move it, "
                         "or pass it with --inversion")
    print(f"reusing the inversion in {cache}", file=sys.stderr)
    return Photo(image, want, cached, None)


def photo_inversion(sd, args, photo: Photo) -> Inversion:
    """The given or cached inversion (checked against the model), or a new one, saved in the cache."""
    inv = photo.inversion
    if inv is not None:
        if inv.null_embeddings is not None and inv.null_embeddings.shape[-1] != sd.unet.cfg.context_dim:
            raise InputError(f"{args.inversion}: its null embeddings are {inv.null_embeddings.shape[-1]} wide, "
                             f"this model's text is {sd.unet.cfg.context_dim}")
        return inv
    inv = invert_photo(sd, args, photo.image, photo.settings)
    inversion.save(photo.cache, inv, {"dtype": args.dtype, "device": str(sd.device)})
    print(f"wrote {photo.cache} (the next edit of this photo with these settings reuses it)", file=sys.stderr)
    return inv
