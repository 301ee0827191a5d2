"""What a new user's first runs hit: odd files, odd sizes, odd step counts, broken checkpoints.

Every refusal must be an InputError that names the problem, never a KeyError or a traceback
from deep inside torch, safetensors or transformers.
"""
import json
import logging
import pickle
import random
import shutil
import struct
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import InputError, checkpoint
from models.attention import Site
from models.checkpoint import load, read_safetensors
from models.text import check_prompts, load_tokenizer
from models.unet import UNet
from p2p.sampler import generate

from conftest import script

make_tiny = script("make_tiny")


def state(sd):
    return {**{f"unet.{k}": v for k, v in sd.unet.state_dict().items()},
            **{f"vae.{k}": v for k, v in sd.vae.state_dict().items()},
            **{f"text.{k}": v for k, v in sd.text.model.state_dict().items()}}


# ---- a long prompt is our error alone --------------------------------------------------------

def test_long_prompt_error_comes_without_the_transformers_warning(capfd, caplog):
    logger = logging.getLogger("transformers")   # transformers' loggers do not propagate to the root
    logger.addHandler(caplog.handler)
    try:
        tokenizer = load_tokenizer()              # fresh: transformers warns once per tokenizer
        with caplog.at_level(logging.DEBUG):
            with pytest.raises(InputError, match="prompt has 80 tokens, at most 75 fit"):
                check_prompts(tokenizer, ["cat " * 80])
            check_prompts(tokenizer, ["cat " * 75])   # exactly 77 with start and end
            with pytest.raises(InputError, match="prompt has 76 tokens"):
                check_prompts(tokenizer, ["cat " * 76])
    finally:
        logger.removeHandler(caplog.handler)
    out, err = capfd.readouterr()
    said = out + err + caplog.text
    assert "sequence length" not in said and "indexing errors" not in said, said
