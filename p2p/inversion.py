"""Real photographs in: DDIM inversion, null-text inversion (Mokady et al., 2023),
negative-prompt inversion (Miyake et al., 2023), direct inversion (Ju et al., 2023, "PnP
Inversion"), and the inversion file.

An inversion finds where the sampler must start (x_T) and what the unconditional half of
guidance must see at each step (the null embeddings), or where the source row must be after
each step (direct inversion: the DDIM trajectory), so that sampling the source prompt gives
the photo back; Prompt-to-Prompt then edits from there. Letters: h w latent size
(image size / 8), m = 77 tokens, D the text width (768 in SD v1).
"""
import hashlib
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from models import InputError, ddim
from models.checkpoint import StableDiffusion

from . import check_finite
from .experiment.output import save_tensors
from .sampler import guidance_batch

MIN_SIZE = 64          # 8x8 latents: the UNet's three stride-2 convs take them down to 1x1
METHODS = ("null-text", "negative-prompt", "ddim", "direct")
GUIDED = ("null-text",)   # methods whose tensors hold only at the guidance they were made for
MAX_NULL_TEXT_STEPS = 100   # the learning rate 1e-2 * (1 - i/100) reaches 0 at outer step 100
EARLY_STOP, EARLY_STOP_SLOPE = 1e-5, 2e-5   # stop the inner loop below 1e-5 + i * 2e-5 (official)


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


@torch.no_grad()
def encode(sd: StableDiffusion, image: torch.Tensor) -> torch.Tensor:
    """z0 [1, 4, h, w]: the posterior mean times 0.18215 (models/vae.py), float32."""
    return sd.vae.encode(image.to(sd.device, sd.dtype)).float()


# ---- the four inversions -----------------------------------------------------------------

def unet_eps(sd: StableDiffusion, x, t: int, context) -> torch.Tensor:
    """eps at x, t (a v-predicting UNet's output converted; linear, so guidance may follow)."""
    return ddim.to_eps(sd.unet(x.to(sd.dtype), t, context.to(sd.dtype)).float(), x.float(), t, sd.prediction)


def guided_eps(sd: StableDiffusion, x, t: int, cond, null, guidance: float) -> torch.Tensor:
    """eps of classifier-free guidance; guidance 1 is the conditional prediction alone."""
    if guidance == 1:
        return unet_eps(sd, x, t, cond)
    eps_null, eps_cond = unet_eps(sd, torch.cat([x, x]), t, guidance_batch(null, cond)).chunk(2)
    return eps_null + guidance * (eps_cond - eps_null)


def invert_step(x, eps, alpha_t: float, alpha_prev: float) -> torch.Tensor:
    """x_{t-1} -> x_t: the DDIM step with the roles of alpha_t and alpha_prev swapped."""
    return ddim.ddim_step(x, eps, alpha_prev, alpha_t)[0]


@torch.no_grad()
def ddim_inversion(sd: StableDiffusion, z0, cond, steps: int, guidance: float = 1.0, null=None,
                   progress: bool = True) -> list[torch.Tensor]:
    """The trajectory [z0, z_1, ..., z_T] (steps + 1 latents): eps at x_{t-1} stands in for eps at x_t."""
    trajectory = [z0.float()]
    for t, alpha_t, alpha_prev in tqdm(ddim.schedule(steps)[::-1], desc="DDIM inversion", disable=not progress,
                                       leave=None, file=sys.stderr):
        x = trajectory[-1]
        trajectory.append(invert_step(x, guided_eps(sd, x, t, cond, null, guidance), alpha_t, alpha_prev))
    return trajectory


def null_text_inversion(sd: StableDiffusion, trajectory: list[torch.Tensor], cond, null, guidance: float = 7.5,
                        inner_steps: int = 10, progress: bool = True) -> torch.Tensor:
    """Per-step unconditional embeddings [steps, m, D] that make guided DDIM from z_T retrace
    `trajectory` (noisiest first); each step starts from the previous step's optimum.
    Mokady et al.'s Algorithm 1: trajectory = the pivots z*_t, null = the null text, guidance = w."""
    steps = len(trajectory) - 1
    if steps > MAX_NULL_TEXT_STEPS or inner_steps < 1:
        raise InputError(f"null-text inversion takes 1 to {MAX_NULL_TEXT_STEPS} steps and at least one inner "
                         f"step (got {steps} and {inner_steps})")
    x, nulls = trajectory[-1], []
    bar = tqdm(ddim.schedule(steps), desc="null-text", disable=not progress, leave=None, file=sys.stderr)
    for i, (t, alpha_t, alpha_prev) in enumerate(bar):
        target = trajectory[steps - i - 1]
        with torch.no_grad():
            eps_cond = unet_eps(sd, x, t, cond)
        null = null.detach().to(torch.float32, copy=True).requires_grad_(True)   # Adam updates it in place
        adam = torch.optim.Adam([null], lr=1e-2 * (1 - i / 100))
        for j in range(inner_steps):
            eps_null = unet_eps(sd, x, t, null)
            x_prev = ddim.ddim_step(x, eps_null + guidance * (eps_cond - eps_null), alpha_t, alpha_prev)[0]
            loss = F.mse_loss(x_prev, target)
            adam.zero_grad()
            loss.backward(inputs=[null])               # no gradient is computed or kept for the weights
            adam.step()
            if loss.item() < EARLY_STOP + i * EARLY_STOP_SLOPE:   # the loss before this update, as officially
                break
        bar.set_postfix_str(f"loss {loss.item():.2e} after {j + 1} Adam steps")
        null = null.detach()
        nulls.append(null)
        with torch.no_grad():
            x = ddim.ddim_step(x, guided_eps(sd, x, t, cond, null, guidance), alpha_t, alpha_prev)[0]
    return torch.cat(nulls)


def negative_prompt_inversion(cond, steps: int) -> torch.Tensor:
    """[steps, m, D]: the source prompt's embedding stands in for the null text at every step."""
    return cond.float().expand(steps, -1, -1)


def direct_trajectory(trajectory: list[torch.Tensor]) -> torch.Tensor:
    """[steps, 4, h, w], noisiest first: z*_{t-1}, where sampling step i must leave the source row.
    Ju et al. add o_i = z*_{t-1} - DDIM step(z*_t, guided eps) to the source row after step i;
    since the row was at z*_t, that puts it on z*_{t-1} exactly. Setting the row to z*_{t-1} is the
    same in exact arithmetic and, in floats, holds in an edit's batch too: the UNet rounds differently
    at another batch size, and the guided steps amplify that (15x a step on the tiny test model)."""
    return torch.cat(trajectory[-2::-1])


def invert(sd: StableDiffusion, z0, prompt: str, method: str = "null-text", steps: int = 50,
           guidance: float = 7.5, inner_steps: int = 10, progress: bool = True):
    """(x_T [1, 4, h, w], null embeddings [steps, m, D] or None, the source row's path [steps, 4, h, w]
    or None): what sampler.generate takes as x_T, null_embeddings and source_trajectory.

    | method      | "null-text", "negative-prompt", "ddim" or "direct"               |
    | guidance    | the scale the photo will be edited at (null-text optimises for it) |
    | inner_steps | Adam steps per outer step at most (null-text only)               |
    """
    if method not in METHODS:
        raise InputError(f"unknown inversion method {method!r} (one of {', '.join(METHODS)})")
    check_finite("guidance", guidance)
    cond, null = sd.text.encode([prompt]), sd.text.encode([""])
    trajectory = ddim_inversion(sd, z0, cond, steps, progress=progress)
    if method == "ddim":
        return trajectory[-1], None, None
    if method == "direct":
        return trajectory[-1], None, direct_trajectory(trajectory)
    if method == "negative-prompt":
        return trajectory[-1], negative_prompt_inversion(cond, steps), None
    return trajectory[-1], null_text_inversion(sd, trajectory, cond, null, guidance, inner_steps, progress), None


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
            "checkpoint_fingerprint", "offsets", "image", "image_sha256")


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
    if "direct_offsets" in tensors:
        raise InputError(f"{path} holds direct inversion offsets, which an older p2p made; this one keeps "
                         "the DDIM trajectory instead: invert again")
    needs = {"ddim": (), "direct": ("trajectory",)}.get(settings.get("method"), ("null_embeddings",))
    missing = [k for k in SETTINGS if k not in settings] + [k for k in ("x_T", "z0", *needs) if k not in tensors]
    if missing == ["checkpoint_fingerprint"]:
        raise InputError(f"{path} was made by an older p2p that did not fingerprint the weights: invert again")
    if missing:
        raise InputError(f"{path} is not a p2p inversion file (it lacks {missing[0]})")
    settings.setdefault("prediction", "epsilon")          # files made before SD 2 was supported
    steps, size = int(settings["steps"]), int(settings["size"].split("x")[0])
    latent = (4, size // 8, size // 8)
    null, pins = tensors.get("null_embeddings"), tensors.get("trajectory")
    if (tensors["x_T"].shape != (1, *latent) or (null is not None and null.shape[0] != steps)
            or (pins is not None and pins.shape != (steps, *latent))):
        raise InputError(f"{path}: tensor shapes do not match its {settings['size']} px, {steps}-step metadata")
    return Inversion(tensors["x_T"], tensors["z0"], null, pins, settings)
