"""LPIPS (Zhang et al. 2018, v0.1) with a SqueezeNet 1.1 trunk, as PIE-Bench scores it (torchmetrics'
LearnedPerceptualImagePatchSimilarity(net_type='squeeze') on images in [-1, 1], no resize).

For images a, b in [0, 1] mapped to x = 2a - 1, y = 2b - 1, and f_l the trunk's features after
slice l (l = 0..6, channels c_l = 64, 128, 256, 384, 384, 512, 512):

    s(x)         = (x - shift) / scale                       per RGB channel (lpips' ScalingLayer)
    n(f)[c, p]   = f[c, p] / (sqrt(sum_c f[c, p]^2) + 1e-10)  unit length over channels at each pixel p
    LPIPS(a, b)  = sum_l mean_p sum_c w_l[c] (n(f_l(s(x))) - n(f_l(s(y))))^2[c, p]

with w_l the learned "lin" weights (a 1x1 convolution to one channel, no bias).

The weights file (safetensors; make it with scripts/convert_lpips.py) holds 57 tensors:

    features.{i}.weight, .bias                          i = 0, the first convolution
    features.{i}.{squeeze,expand1x1,expand3x3}.weight, .bias   i = 3, 4, 6, 7, 9, 10, 11, 12, the Fire modules
    lin{l}.weight                                       [1, c_l, 1, 1], l = 0..6

The backbone carries torchvision's names, so squeezenet1_1().features.state_dict() is a plain copy
under "features."; lpips stores the lin weights as lin{l}.model.1.weight, the 1 indexing past the
Dropout that only training uses, and here they are lin{l}.weight. Loading is strict: safetensors
only (nothing is unpickled), every key present with its shape, nothing else, all values finite.
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from models import InputError

from ..viz import as_tensor

SHIFT, SCALE = (-.030, -.088, -.188), (.458, .448, .450)  # lpips' ScalingLayer
SLICE_ENDS = (2, 5, 8, 10, 11, 12, 13)                  # lpips cuts features[0:2], [2:5], ..., [12:13]
CHANNELS = (64, 128, 256, 384, 384, 512, 512)
EPS = 1e-10                                             # lpips.normalize_tensor
MIN_SIDE = 17   # the stride-2 conv and three stride-2 pools (ceil_mode) leave 1 pixel of 17


class Fire(nn.Module):
    """SqueezeNet's block (Iandola et al. 2016): squeeze to s channels by 1x1, then e channels
    each from a 1x1 and a 3x3 expansion, concatenated: c_in -> 2e channels, same h w."""

    def __init__(self, c_in: int, s: int, e: int):
        super().__init__()
        self.squeeze = nn.Conv2d(c_in, s, 1)
        self.expand1x1 = nn.Conv2d(s, e, 1)
        self.expand3x3 = nn.Conv2d(s, e, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(x)), F.relu(self.expand3x3(x))], dim=1)


def pool():
    return nn.MaxPool2d(3, stride=2, ceil_mode=True)


class SqueezeLpips(nn.Module):
    """torchvision's squeezenet1_1().features (same indices) and the 7 lin layers."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, stride=2), nn.ReLU(), pool(), Fire(64, 16, 64), Fire(128, 16, 64),
            pool(), Fire(128, 32, 128), Fire(256, 32, 128),
            pool(), Fire(256, 48, 192), Fire(384, 48, 192), Fire(384, 64, 256), Fire(512, 64, 256))
        for l, c in enumerate(CHANNELS):
            self.add_module(f"lin{l}", nn.Conv2d(c, 1, 1, bias=False))
        self.register_buffer("shift", torch.tensor(SHIFT)[:, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE)[:, None, None], persistent=False)

    def slices(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [1, 3, H, W] in [-1, 1] -> the 7 unit-normalised feature maps [1, c_l, h_l, w_l]."""
        x, out = (x - self.shift) / self.scale, []
        for i, layer in enumerate(self.features, start=1):
            x = layer(x)
            if i in SLICE_ENDS:
                out.append(x / (x.square().sum(1, keepdim=True).sqrt() + EPS))
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return sum(getattr(self, f"lin{l}")((fx - fy).square()).mean((2, 3))
                   for l, (fx, fy) in enumerate(zip(self.slices(x), self.slices(y))))[:, 0]


class Lpips:
    """The LPIPS distance of two images (lower: more alike; 0 for equal images)."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        self.net = SqueezeLpips().eval()
        expected = self.net.state_dict()
        missing = [k for k in expected if k not in weights]
        unexpected = [k for k in weights if k not in expected]
        if missing or unexpected:
            what = f"lack {missing[0]}" if missing else f"have an unexpected tensor {unexpected[0]}"
            raise InputError(f"LPIPS weights {what} (the layout is in p2p/eval/lpips.py; make the file with "
                             "scripts/convert_lpips.py)")
        for k, t in expected.items():
            if weights[k].shape != t.shape:
                raise InputError(f"LPIPS weights: {k} has shape {tuple(weights[k].shape)}, expected {tuple(t.shape)}")
            if not weights[k].is_floating_point() or not weights[k].isfinite().all():
                raise InputError(f"LPIPS weights: {k} has values that are not finite floats")
        self.net.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)

    @classmethod
    def load(cls, path):
        """Lpips from a safetensors file, or None with one note on stderr when there is none."""
        path = Path(path)
        if not path.is_file():
            print(f"note: LPIPS skipped: no weights file {path} (make it with: python scripts/convert_lpips.py "
                  f"--out {path}, where torchvision and lpips are installed)", file=sys.stderr)
            return None
        try:
            weights = load_file(path)
        except (SafetensorError, OSError) as e:
            raise InputError(f"{path}: not a readable .safetensors file ({str(e).splitlines()[0]}); "
                             "p2p never unpickles, make the file with scripts/convert_lpips.py") from None
        return cls(weights)

    @torch.no_grad()
    def distance(self, a, b) -> float:
        """a, b: images [3, H, W] in [0, 1] (or PIL images) of one size, H and W >= 17."""
        a, b = as_tensor(a).float(), as_tensor(b).float()
        if a.shape != b.shape or a.ndim != 3 or a.shape[0] != 3:
            raise InputError(f"LPIPS compares two RGB images of one size, not {tuple(a.shape)} and {tuple(b.shape)}")
        if min(a.shape[1:]) < MIN_SIDE:
            raise InputError(f"LPIPS needs images of at least {MIN_SIDE}x{MIN_SIDE} pixels, not {tuple(a.shape[1:])}")
        return self.net(2 * a[None] - 1, 2 * b[None] - 1).item()
