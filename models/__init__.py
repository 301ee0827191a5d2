"""Stable Diffusion v1 and 2.x, written from scratch: UNet, VAE, CLIP and OpenCLIP text encoders, DDIM, PLMS,
loaders."""


class InputError(ValueError):
    """Bad input from the user (a path, a checkpoint, a prompt); the CLI prints it as one line."""
