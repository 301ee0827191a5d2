"""Write tests/golden/lpips.safetensors: seeded LPIPS weights in p2p's layout, image pairs, and the
distances the lpips package (the reference, never a dependency) gives them.

How it was run (once, from the repository root):

    python -m venv /tmp/lp
    /tmp/lp/bin/pip install torch==2.14.1 torchvision==0.29.1 lpips==0.1.4 safetensors
    /tmp/lp/bin/python scripts/make_golden_lpips.py

(torchvision 0.28.0, the release for torch 2.13, is on PyPI only as a CUDA build whose compiled
ops do not load with the CPU torch; the 2.14.1/0.29.1 pair loads together and runs on the CPU.)

Each pair's distance is written twice: in float32, as lpips runs, and with the model and images in
float64. The float64 ones pin the maths; the float32 ones say how far the reference's own float32
rounding goes on these pairs (up to 1.1e-8; pair 2 nearly cancels: 7.9e-10 on 7.7e-5), the floor the
tests give p2p's float32 path. The weights and pairs are those of the first run (torch 2.13 with
torchvision 0.2.2.post3, whose squeezenet1_1 builds the same features), regenerated identically.

ImageNet weights cannot be downloaded here, so the trunk is random (pnet_rand=True, seeded, with
random biases too, where torchvision starts them at 0); the lin layers are lpips' real v0.1
squeeze weights. The pairs are uint8 [H, W, 3]; the reference reads them as x / 255 in float32
with normalize=True (2x - 1), what PIE-Bench's [-1, 1] input is. The 70 x 90 pair makes every
ceil_mode pool round up somewhere.
"""
import sys
from importlib.metadata import version
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "golden" / "lpips.safetensors"
sys.path.insert(0, str(ROOT / "scripts"))


def pairs(g: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Four uint8 image pairs [H, W, 3]: noise vs noise, a pattern vs its shifted noisy copy,
    noise vs a slightly perturbed copy, and non-square rings vs a blurred low-contrast copy."""
    def u8(x):
        return (x.clamp(0, 1) * 255).round().to(torch.uint8)

    def noise(h, w, scale=1.0):
        return scale * torch.rand(h, w, 3, generator=g)

    y, x = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    pattern = torch.stack([x, y, 0.5 + 0.5 * torch.sin(12 * x) * torch.cos(9 * y)], -1)
    a = noise(64, 64)
    out = [(u8(noise(64, 64)), u8(noise(64, 64))),
           (u8(pattern), u8(pattern.roll(2, dims=1) + noise(64, 64, 0.1) - 0.05)),
           (u8(a), u8(a + noise(64, 64, 4 / 255) - 2 / 255))]
    y, x = torch.meshgrid(torch.linspace(-1, 1, 70), torch.linspace(-1.3, 1.3, 90), indexing="ij")
    rings = 0.5 + 0.5 * torch.cos(20 * (x * x + y * y).sqrt())
    rings = torch.stack([rings, rings.flip(1), 1 - rings], -1)
    blurred = torch.nn.functional.avg_pool2d(rings.permute(2, 0, 1)[None], 5, 1, 2, count_include_pad=False)
    out.append((u8(rings), u8(0.2 + 0.6 * blurred[0].permute(1, 2, 0))))
    return out


def main():
    import copy

    import lpips   # the reference, only here
    from safetensors.torch import save_file
    from convert_lpips import our_layout
    torch.manual_seed(0)
    model = lpips.LPIPS(net="squeeze", version="0.1", pretrained=True, pnet_rand=True, verbose=False).eval()
    with torch.no_grad():
        for name, p in model.net.named_parameters():
            if name.endswith(".bias"):
                p.uniform_(-0.1, 0.1)
    tensors = our_layout(model.state_dict())
    model64 = copy.deepcopy(model).double()
    distances, distances64 = [], []
    for k, (a, b) in enumerate(pairs(torch.Generator().manual_seed(0))):
        with torch.no_grad():
            for net, dtype, out in ((model, torch.float32, distances), (model64, torch.float64, distances64)):
                image = lambda u: u.permute(2, 0, 1)[None].to(dtype) / 255
                out.append(net(image(a), image(b), normalize=True).item())
        tensors[f"golden.{k}.a"], tensors[f"golden.{k}.b"] = a.contiguous(), b.contiguous()
        print(f"pair {k} {tuple(a.shape)}: {distances[-1]:.9g} (float32), {distances64[-1]:.17g} (float64)")
    tensors["golden.distances"] = torch.tensor(distances, dtype=torch.float64)
    tensors["golden.distances64"] = torch.tensor(distances64, dtype=torch.float64)
    reference = f"lpips {version('lpips')}, torchvision {version('torchvision')}, torch {torch.__version__}"
    save_file(tensors, OUT, metadata={"reference": reference})
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.1f} MB; {reference})")


if __name__ == "__main__":
    main()
