"""DDIM (Song et al., 2021) on the SD v1 noise schedule. Pure: no model, device or progress.

Symbols: alpha_t is the cumulative product bar-alpha_t (alphas_cumprod[t]); x_t the noisy
latent; eps the predicted noise; x0 the predicted clean latent.
"""
from typing import Callable, Iterable

import torch

TRAIN_STEPS = 1000      # SD v1 was trained with 1000 noise levels
BETA_START, BETA_END = 0.00085, 0.012   # linear_start / linear_end of v1-inference.yaml
STEPS_OFFSET = 1        # SD v1 samplers shift the "leading" timesteps by one (steps_offset=1)


def alphas_cumprod() -> torch.Tensor:
    """bar-alpha_t for t = 0..999: scaled-linear betas, computed in float64 as LDM does."""
    betas = torch.linspace(BETA_START ** 0.5, BETA_END ** 0.5, TRAIN_STEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def timesteps(steps: int) -> list[int]:
    """The "leading" DDIM timesteps, noisiest first: 981, 961, ..., 1 for 50 steps. The offset
    holds only while the top step stays <= 999: 1000 steps are 999, ..., 0, each level once."""
    stride = TRAIN_STEPS // steps
    offset = STEPS_OFFSET if (steps - 1) * stride + STEPS_OFFSET < TRAIN_STEPS else 0
    return [i * stride + offset for i in reversed(range(steps))]


def schedule(steps: int) -> list[tuple[int, float, float]]:
    """(t, alpha_t, alpha_prev) per step. alpha_prev past the end is bar-alpha_0
    (set_alpha_to_one=False), not 1."""
    alphas, stride = alphas_cumprod(), TRAIN_STEPS // steps
    return [(t, alphas[t].item(), alphas[t - stride].item() if t >= stride else alphas[0].item())
            for t in timesteps(steps)]




def to_eps(output: torch.Tensor, x_t: torch.Tensor, t: int, prediction: str = "epsilon") -> torch.Tensor:
    """The noise eps from a UNet's output at x_t, the one place the prediction type is read.
    For v_prediction (Salimans & Ho, 2022), v = sqrt(a) eps - sqrt(1 - a) x0 with a = alpha_t, so

        eps = sqrt(a) v + sqrt(1 - a) x_t,   and then   x0 = sqrt(a) x_t - sqrt(1 - a) v

    is what ddim_step's x0 = (x_t - sqrt(1 - a) eps) / sqrt(a) gives: every sampler and inversion
    works on eps unchanged. The conversion is linear in the output, so guidance may come first."""
    if prediction == "epsilon":
        return output
    if prediction != "v_prediction":
        raise ValueError(f"unknown prediction type {prediction!r}")
    a = alphas_cumprod()[t].item()
    return a ** 0.5 * output + (1 - a) ** 0.5 * x_t


def ddim_step(x_t, eps, alpha_t: float, alpha_prev: float, eta: float = 0.0, noise=None):
    """One DDIM update x_t -> x_{t-1} (eq. 12 of the DDIM paper); returns (x_prev, x0)."""
    x0 = (x_t - (1 - alpha_t) ** 0.5 * eps) / alpha_t ** 0.5
    # eta 0 skips the root: with the alphas swapped (DDIM inversion) its argument is negative
    sigma = eta * ((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)) ** 0.5 if eta > 0 else 0.0
    x_prev = alpha_prev ** 0.5 * x0 + (1 - alpha_prev - sigma ** 2) ** 0.5 * eps
    if sigma > 0:
        x_prev = x_prev + sigma * noise
    return x_prev, x0


def sample(denoise: Callable, x: torch.Tensor, steps: Iterable[tuple[int, float, float]],
           after_step: Callable | None = None, eta: float = 0.0, generator=None) -> torch.Tensor:
    """Run DDIM from x_T. `denoise(x, t, i)` returns eps (guidance and edits live there);
    `after_step(i, x)` may change x after each step (local blending does)."""
    for i, (t, alpha_t, alpha_prev) in enumerate(steps):
        noise = torch.randn(x.shape, generator=generator).to(x) if eta > 0 else None
        x, _ = ddim_step(x, denoise(x, t, i), alpha_t, alpha_prev, eta, noise)
        if after_step is not None:
            x = after_step(i, x)
    return x
