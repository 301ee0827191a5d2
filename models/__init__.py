"""Stable Diffusion v1 and 2.x, written from scratch: UNet, VAE, CLIP and OpenCLIP text encoders, DDIM, PLMS,
loaders."""
from pathlib import Path


class InputError(ValueError):
    """Bad input from the user (a path, a checkpoint, a prompt); the CLI prints it as one line."""


# names the light command line shows without importing torch
PREDICTIONS = ("epsilon", "v_prediction")   # what a UNet's output is: SD v1 and 2.x-base; SD 2.x at 768
DTYPES = ("float32", "float16", "bfloat16")
# the baby SD trained on the shapes of p2p/eval/world.py by scripts/train_baby.py --out weights/baby:
# the model the CLI uses when no --weights is given
BABY = Path(__file__).resolve().parents[1] / "weights" / "baby" / "baby-diffusers"
