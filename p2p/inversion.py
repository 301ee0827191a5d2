"""Real photographs in: DDIM inversion, null-text inversion (Mokady et al., 2023),
negative-prompt inversion (Miyake et al., 2023) and direct inversion (Ju et al., 2023, "PnP
Inversion"), the maths only: the photo, its settings and the inversion file are
p2p/experiment/photo.py's, which checks what reaches here.

An inversion finds where the sampler must start (x_T) and what the unconditional half of
guidance must see at each step (the null embeddings), or where the source row must be after
each step (direct inversion: the DDIM trajectory), so that sampling the source prompt gives
the photo back; Prompt-to-Prompt then edits from there. Letters: h w latent size
(image size / 8), m = 77 tokens, D the text width (768 in SD v1).
"""
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from models import InputError, ddim
from models.checkpoint import StableDiffusion

from .sampler import guidance_batch, guidance_halves

METHODS = ("null-text", "negative-prompt", "ddim", "direct")
EARLY_STOP, EARLY_STOP_SLOPE = 1e-5, 2e-5   # stop the inner loop below 1e-5 + i * 2e-5 (official)


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
    eps_null, eps_cond = guidance_halves(unet_eps(sd, guidance_batch(x, x), t, guidance_batch(null, cond)))
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
    Mokady et al.'s Algorithm 1: trajectory = the pivots z*_t, null = the null text, guidance = w.
    The learning rate 1e-2 * (1 - i/100) reaches 0 at outer step 100 (photo.MAX_NULL_TEXT_STEPS)."""
    steps = len(trajectory) - 1
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
    cond, null = sd.text.encode([prompt]), sd.text.encode([""])
    trajectory = ddim_inversion(sd, z0, cond, steps, progress=progress)
    if method == "ddim":
        return trajectory[-1], None, None
    if method == "direct":
        return trajectory[-1], None, direct_trajectory(trajectory)
    if method == "negative-prompt":
        return trajectory[-1], negative_prompt_inversion(cond, steps), None
    return trajectory[-1], null_text_inversion(sd, trajectory, cond, null, guidance, inner_steps, progress), None
