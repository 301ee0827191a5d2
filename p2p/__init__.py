"""Prompt-to-Prompt on the Stable Diffusion of models/: edits, token alignment, sampling, inversion, CLI."""
from models import InputError


def check_finite(what: str, *tensors):
    """Refuse results holding nan or inf before anything is written: they would be a black image, a
    latents or inversion file of nan, with nothing said. (No torch import: the CLI starts light.)"""
    if not all(bool(t.isfinite().all()) for t in tensors if t is not None):
        raise InputError(f"{what} came out nan or inf, so nothing was written (a guidance too large, or weights "
                         "holding nan or inf)")
