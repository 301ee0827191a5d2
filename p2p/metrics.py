"""How far an edit kept what it should: background preservation and edit locality.

Images are float tensors [3, H, W] in [0, 1] (`as_tensor` takes PIL images too); a region is a
boolean mask [H, W], True inside the edit region. The background is everything outside it.
With no region, the whole image is the background; a region that leaves no background gives
nan for the background metrics.

    MSE(a, b; B)  = mean over pixels p in B and channels c of (a[c, p] - b[c, p])^2
    PSNR(a, b; B) = 10 log10(1 / MSE)                       (data range 1; inf when equal)
    SSIM(a, b; B) = mean over p in B and c of ssim_map[c, p], Wang et al. (2004):
        mu, sigma^2, sigma_ab from a Gaussian window (11 x 11, sigma 1.5, normalised), so
        ssim = (2 mu_a mu_b + C1)(2 sigma_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(sigma_a^2 + sigma_b^2 + C2)),
        C1 = (0.01)^2, C2 = (0.03)^2; the window is used only where it fits the image
        ("valid"), so the map is (H - 10) x (W - 10) and the region is cropped to match.
    locality(a, b; R) = sum over R of |a - b| / sum over the image of |a - b|   (1: all change inside)
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models import InputError

WINDOW, SIGMA = 11, 1.5          # Wang et al. (2004)
K1, K2 = 0.01, 0.03


def as_tensor(image) -> torch.Tensor:
    """A PIL image or an array [H, W, 3] of uint8 -> float64 [3, H, W] in [0, 1]; tensors pass."""
    if isinstance(image, torch.Tensor):
        return image.double()
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).double() / 255


def background(region: torch.Tensor | None, shape) -> torch.Tensor:
    """The pixels outside the region, [H, W] boolean (all of them without a region)."""
    if region is None:
        return torch.ones(shape[-2:], dtype=torch.bool)
    if tuple(region.shape) != tuple(shape[-2:]):
        raise InputError(f"an edit region of {tuple(region.shape)} does not fit images of {tuple(shape[-2:])}")
    return ~region.bool()


def mse(a, b, region=None) -> float:
    a, b = as_tensor(a), as_tensor(b)
    keep = background(region, a.shape)
    if not keep.any():
        return math.nan                                    # the region is the whole image: no background
    return (a - b).square()[:, keep].mean().item()


def psnr(a, b, region=None) -> float:
    error = mse(a, b, region)
    return math.inf if error == 0 else math.nan if math.isnan(error) else 10 * math.log10(1 / error)


def gaussian_window() -> torch.Tensor:
    x = torch.arange(WINDOW, dtype=torch.float64) - WINDOW // 2
    g = torch.exp(-x ** 2 / (2 * SIGMA ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]          # [1, 1, 11, 11]


def ssim_map(a, b) -> torch.Tensor:
    """SSIM per channel and pixel, [3, H - 10, W - 10] (the window's valid positions)."""
    a, b = as_tensor(a)[:, None], as_tensor(b)[:, None]   # channels as a batch: [3, 1, H, W]
    if min(a.shape[-2:]) < WINDOW:
        raise InputError(f"SSIM needs images of at least {WINDOW}x{WINDOW} pixels")
    blur = lambda x: F.conv2d(x, gaussian_window())
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = K1 ** 2, K2 ** 2
    return (((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))[:, 0]


def ssim(a, b, region=None) -> float:
    s = ssim_map(a, b)
    keep = background(region, as_tensor(a).shape)[WINDOW // 2:-(WINDOW // 2), WINDOW // 2:-(WINDOW // 2)]
    if not keep.any():
        return math.nan                                    # no background pixel where the window fits
    return s[:, keep].mean().item()


def locality(a, b, region) -> float:
    """The share of the change (L1) that falls inside the region; nan when nothing changed."""
    change = (as_tensor(a) - as_tensor(b)).abs().sum(0)
    region = ~background(region, change.shape)
    total = change.sum().item()
    return math.nan if total == 0 else change[region].sum().item() / total


def attention_region(maps: torch.Tensor, size, threshold: float = 0.3) -> torch.Tensor:
    """An edit region from attention: maps [h, w] (the edited words' summed attention), divided
    by their max, resized (nearest) to `size` (H, W), above the threshold."""
    m = maps.double() / maps.max().clamp(min=1e-12)
    return F.interpolate(m[None, None], size=tuple(size))[0, 0] > threshold


def pixel_metrics(source, edited, region=None) -> dict[str, float]:
    """Background preservation of `edited` against `source`, and locality when there is a region."""
    out = {"mse": mse(source, edited, region), "psnr": psnr(source, edited, region),
           "ssim": ssim(source, edited, region)}
    if region is not None:
        out["locality"] = locality(source, edited, region)
    return out
