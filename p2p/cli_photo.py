"""The photo half of the `p2p` command: `p2p invert`, and `p2p edit --image` (cli.py calls these).

An edit of a photo starts from an inversion: one given with --inversion must have been made
for the same prompt, photo, size, steps (and guidance, for null-text) and checkpoint; without
one, the edit inverts first and keeps the result next to its output (PHOTO.inversion.safetensors),
reused by the next edit of that photo when every setting matches.
"""
import sys
from pathlib import Path

import torch

from models import InputError

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


def check_settings(method: str, steps: int, inner_steps: int, size: int):
    if size < inversion.MIN_SIZE:
        raise InputError(f"photos are edited at {inversion.MIN_SIZE} px or more (got {size})")
    if method == "null-text" and steps > inversion.MAX_NULL_TEXT_STEPS:
        raise InputError(f"null-text inversion takes at most {inversion.MAX_NULL_TEXT_STEPS} steps (got {steps})")
    if inner_steps < 1:
        raise InputError(f"--inner-steps must be at least 1 (got {inner_steps})")


def settings(args, prompt: str, size: int, checkpoint: str) -> dict[str, str]:
    """The inversion's metadata (inversion.SETTINGS) for these flags."""
    return {"prompt": prompt, "method": args.method, "steps": str(args.steps), "guidance": str(args.guidance),
            "inner_steps": str(args.inner_steps) if args.method == "null-text" else "",
            "size": f"{size}x{size}", "checkpoint": checkpoint,
            "offsets": ",".join(map(str, offsets(args.offsets))),
            "image": args.image.name, "image_sha256": inversion.file_hash(args.image)}


def invert_photo(sd, args, image: torch.Tensor, prompt: str) -> Inversion:
    z0 = inversion.encode(sd, image)
    x_T, null = inversion.invert(sd, z0, prompt, args.method, args.steps, args.guidance, args.inner_steps)
    return Inversion(x_T, z0, null, settings(args, prompt, image.shape[-1], sd.name))


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
         "checkpoint": "an inversion only holds for the checkpoint that made it"}


def check_match(path: Path, inv: Inversion, want: dict[str, str]):
    """One-line error at the first setting of `inv` that differs from `want`."""
    if inv.settings["image_sha256"] != want["image_sha256"]:
        raise InputError(f"{path} inverts another photo ({inv.settings['image']}), not {want['image']}")
    for key in ("prompt", "size", "steps", "guidance", "checkpoint"):
        if key == "guidance" and inv.settings["method"] != "null-text":
            continue
        if inv.settings[key] != want[key]:
            raise InputError(f"{path} was made with {key} {inv.settings[key]!r}, not {want[key]!r}: {HINTS[key]}")


def prepare(args) -> tuple[torch.Tensor, Inversion | None]:
    """Before the model loads: the photo [1, 3, size, size] and the --inversion file, checked."""
    if args.height != args.width:
        raise InputError(f"photos are edited square: --height and --width differ ({args.height}, {args.width})")
    if args.inversion is None:
        check_settings(args.method, args.steps, args.inner_steps, args.height)
        return inversion.load_image(args.image, args.height, offsets(args.offsets)), None
    inv = inversion.read(args.inversion)
    image = inversion.load_image(args.image, args.height, offsets(inv.settings["offsets"]))   # as it was inverted
    check_match(args.inversion, inv, settings(args, args.source, args.height, inv.settings["checkpoint"]))
    return image, inv


def photo_inversion(sd, args, image: torch.Tensor, inv: Inversion | None) -> Inversion:
    """The given inversion (checked against the model), a matching cached one, or a new one saved."""
    want = settings(args, args.source, args.height, sd.name)
    if inv is not None:
        check_match(args.inversion, inv, want)
        if inv.null_embeddings is not None and inv.null_embeddings.shape[-1] != sd.unet.cfg.context_dim:
            raise InputError(f"{args.inversion}: its null embeddings are {inv.null_embeddings.shape[-1]} wide, "
                             f"this model's text is {sd.unet.cfg.context_dim}")
        return inv
    cache = args.out.parent / f"{args.image.stem}.inversion.safetensors"
    if cache.is_file():
        try:
            cached = inversion.read(cache)
        except InputError:
            cached = None
        if cached is not None and all(cached.settings[k] == v for k, v in want.items()):
            print(f"reusing the inversion in {cache}", file=sys.stderr)
            return cached
        print(f"{cache} was made with other settings: inverting again", file=sys.stderr)
    inv = invert_photo(sd, args, image, args.source)
    inversion.save(cache, inv)
    print(f"wrote {cache} (the next edit of this photo with these settings reuses it)", file=sys.stderr)
    return inv
