"""Prompt-to-Prompt on the Stable Diffusion of models/: edits, token alignment, sampling, inversion, CLI."""
import math

from models import InputError


def check_finite(what: str, value: float):
    """Refuse nan and inf at the Python entry points, as the CLI refuses them in its flags."""
    if not math.isfinite(value):
        raise InputError(f"{what} must be a finite number, got {value}")
