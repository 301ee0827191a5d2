"""Stable Diffusion v1, written from scratch: UNet, VAE, CLIP text encoder, DDIM, loaders."""


class InputError(ValueError):
    """Bad input from the user (a path, a checkpoint, a prompt); the CLI prints it as one line."""
