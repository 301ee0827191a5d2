"""Write lpips-squeeze.safetensors, the weights p2p's LPIPS metric (p2p/eval/lpips.py) reads.

Run it once, in an environment of your own that has torchvision and the lpips package
(neither is a dependency of p2p):

    pip install torchvision lpips==0.1.4
    python scripts/convert_lpips.py --out weights/lpips-squeeze.safetensors

It takes torchvision's ImageNet squeezenet1_1 features and lpips' v0.1 "squeeze" lin layers
(what torchmetrics' LearnedPerceptualImagePatchSimilarity(net_type='squeeze') uses) and writes them
under p2p's names (see p2p/eval/lpips.py). This is the only place those pickles are read, and only by
the trusted packages' own loaders (torchvision's weight download, lpips' bundled .pth); p2p itself
only ever reads the safetensors file written here.
"""
import argparse
import os
import re
import sys
from importlib.metadata import version

RENAMES = ((r"net\.slice\d\.(\d+)\.(.+)", r"features.\1.\2"),   # lpips keeps torchvision's indices
           (r"(lin\d)\.model\.1\.weight", r"\1.weight"))          # model.0 is the training Dropout
DROPPED = ("scaling_layer.", "lins.")    # constants p2p defines, and a second name for lin0..lin6


def our_layout(state: dict) -> dict:
    """An lpips.LPIPS(net='squeeze') state dict -> p2p's names, contiguous float32 tensors."""
    out = {}
    for key, tensor in state.items():
        if key.startswith(DROPPED):
            continue
        for pattern, name in RENAMES:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, name, key)] = tensor.detach().float().contiguous()
                break
        else:
            raise SystemExit(f"convert_lpips: unexpected tensor {key} in lpips' squeeze model")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="lpips-squeeze.safetensors", help="where to write (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        import lpips
        from safetensors.torch import save_file
    except ImportError as e:
        sys.exit(f"convert_lpips needs lpips, torchvision and safetensors ({e}): pip install torchvision "
                 "lpips==0.1.4 safetensors")
    # pnet_rand=False: lpips builds torchvision's squeezenet1_1 with its ImageNet weights
    model = lpips.LPIPS(net="squeeze", version="0.1", pretrained=True, pnet_rand=False, verbose=False)
    tensors = our_layout(model.state_dict())
    metadata = {"format": "p2p LPIPS v0.1 squeeze", "lpips": version("lpips"), "torchvision": version("torchvision")}
    partial = f"{args.out}.partial"
    save_file(tensors, partial, metadata=metadata)
    os.replace(partial, args.out)           # a reader never sees half a file
    print(f"wrote {args.out} ({len(tensors)} tensors)")


if __name__ == "__main__":
    main()
