"""Write tests/golden/metrics.json: PSNR and SSIM of seeded image pairs by scikit-image.

How it was run (once, from the repository root):

    pip install scikit-image==0.26.0    # the reference; never a dependency of p2p or tests/
    python scripts/make_golden_metrics.py

SSIM is Wang et al. (2004) as scikit-image computes it with gaussian_weights=True, sigma 1.5
(an 11x11 window), use_sample_covariance=False, data_range 1, the mean over the map cropped by
the window's half-width, channels averaged: what p2p/eval/metrics.py defines. The pairs are made
here from a seed (an image and a blurred, noised, shifted copy), so the test rebuilds them.
"""
import json
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "tests" / "golden" / "metrics.json"
SIZES = [(32, 48), (64, 64), (23, 17)]


def pair(seed: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Two float64 images [3, H, W] in [0, 1] from one seed; the test makes the same ones."""
    rng = np.random.default_rng(seed)
    a = rng.random((3, height, width))
    b = np.clip(0.7 * a + 0.3 * np.roll(a, 1, axis=2) + 0.05 * rng.standard_normal(a.shape), 0, 1)
    return a, b


def main():
    import skimage   # the reference, only here (the test imports pair() without it)
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    cases = []
    for seed, (h, w) in enumerate(SIZES):
        a, b = pair(seed, h, w)
        ssim = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                     data_range=1.0, channel_axis=0)
        cases.append({"seed": seed, "height": h, "width": w, "psnr": float(peak_signal_noise_ratio(a, b, data_range=1.0)),
                      "ssim": float(ssim)})
        print(cases[-1])
    OUT.write_text(json.dumps({"reference": f"scikit-image {skimage.__version__}", "cases": cases}, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    sys.exit(main())
