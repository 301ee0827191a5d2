"""PLMS, as the SD v1.4 checkpoint's scheduler ran in the official Prompt-to-Prompt notebook.

That scheduler is PNDM (Liu et al., 2022) with `skip_prk_steps`: no Runge-Kutta warm-up, the
linear multistep method from the first step on (crowsonkb's PLMS). Pure: no model, device or
progress. Schedule as in models/ddim.py (scaled-linear betas 0.00085..0.012, "leading"
timesteps with offset 1, set_alpha_to_one false).

Symbols: alpha_t is bar-alpha_t (alphas_cumprod[t]); x_t the latent; e_k the eps of the k-th
stored UNet call; s = 1000 // N the stride. For N steps there are N + 1 UNet calls on
t_0, t_1, t_1, t_2, ..., t_{N-1} (981, 961, 961, 941, ..., 1 for N = 50):

    call 0 at t_0:  store e_0;       x <- T(x_T, e_0, t_0 -> t_1)        (provisional)
    call 1 at t_1:  e_1 not stored;  x <- T(x_T, (e_0 + e_1)/2, t_0 -> t_1)
    call k >= 2:    store e;         x <- T(x, e', t -> t - s), e' the multistep mix of the
                    stored eps, newest first: (3, -1)/2, (23, -16, 5)/12, (55, -59, 37, -9)/24

T is PNDM's transfer (eq. 9 of the paper), with alpha_prev = alpha_{t-s}, or bar-alpha_0 past
the end:

    T(x, e, t -> t') = sqrt(a'/a) x - (a' - a) e / (a sqrt(1 - a') + sqrt(a (1 - a) a')),
    a = alpha_t, a' = alpha_t'.
"""
from typing import Callable, Iterable

import torch

from . import ddim

# Adams-Bashforth coefficients by the number of stored eps, newest first (PNDM's eq. 12)
MULTISTEP = {1: (1,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
             4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def timesteps(steps: int) -> list[int]:
    """The UNet's timesteps, one per call: the DDIM ones with the second repeated (N + 1 calls;
    one call for N = 1, which has no second)."""
    t = ddim.timesteps(steps)
    return t[:2] + t[1:]


def schedule(steps: int) -> list[tuple[int, float, float]]:
    """(t, alpha_from, alpha_to) per UNet call: the call evaluates the UNet at t and moves the
    sample from alpha_from to alpha_to. Call 1 redoes call 0's move, t_0 -> t_1."""
    calls = ddim.schedule(steps)   # (t, alpha_t, alpha_prev) per DDIM step
    return calls[:1] + [(calls[1][0], *calls[0][1:])] + calls[1:] if steps > 1 else calls


def transfer(x_t, eps, alpha_t: float, alpha_prev: float):
    """PNDM's transfer x_t -> x_prev for a given eps (algebraically the DDIM eta-0 step)."""
    denom = alpha_t * (1 - alpha_prev) ** 0.5 + (alpha_t * (1 - alpha_t) * alpha_prev) ** 0.5
    return (alpha_prev / alpha_t) ** 0.5 * x_t - (alpha_prev - alpha_t) / denom * eps


def multistep(history: list[torch.Tensor]) -> torch.Tensor:
    """e' from the stored eps (oldest first; the last four are used)."""
    recent = history[::-1][:4]
    return sum(c * e for c, e in zip(MULTISTEP[len(recent)], recent))


def sample(denoise: Callable, x: torch.Tensor, calls: Iterable[tuple[int, float, float]],
           after_step: Callable | None = None) -> torch.Tensor:
    """Run PLMS from x_T over `schedule(N)`. `denoise(x, t, i)` returns eps for call i;
    `after_step(i, x)` may change x after each of the N + 1 updates (local blending does), and
    the next call sees the changed x, as in the notebook's loop. Call 1 steps from x_T itself."""
    x_T, history = x, []
    for i, (t, alpha_from, alpha_to) in enumerate(calls):
        eps = denoise(x, t, i)
        if i == 1:
            x = transfer(x_T, (history[0] + eps) / 2, alpha_from, alpha_to)
        else:
            history = history[-3:] + [eps]
            x = transfer(x, multistep(history), alpha_from, alpha_to)
        if after_step is not None:
            x = after_step(i, x)
    return x
