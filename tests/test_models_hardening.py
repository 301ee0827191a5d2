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


# ---- sizes that are multiples of 8 but not of 64 -------------------------------------------

@torch.no_grad()
def test_unet_runs_at_latents_9x25_and_1x25(tiny):
    ctx = tiny.text.encode(["a cat"])
    for h, w in [(9, 25), (1, 25), (25, 9), (3, 5)]:
        eps = tiny.unet(torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(0)), 500, ctx)
        assert eps.shape == (1, 4, h, w) and torch.isfinite(eps).all()


@torch.no_grad()
def test_unet_runs_at_latents_1x1(tiny):
    """8x8 pixels. The tiny model's first GroupNorm has one channel per group, and torch refuses
    one value per group, so the tiny weights go into a UNet with 16 groups (same shapes)."""
    unet = UNet(replace(tiny.unet.cfg, groups=16)).eval()
    unet.load_state_dict(tiny.unet.state_dict())
    eps = unet(torch.randn(2, 4, 1, 1, generator=torch.Generator().manual_seed(0)), 500, tiny.text.encode(["a", "b"]))
    assert eps.shape == (2, 4, 1, 1) and torch.isfinite(eps).all()


def test_generate_at_200x72_agrees_in_both_layouts(tiny_file, tiny_folder):
    a = generate(load(tiny_file), ["a cat"], steps=2, height=72, width=200, progress=False)
    b = generate(load(tiny_folder), ["a cat"], steps=2, height=72, width=200, progress=False)
    assert a.shape == (1, 4, 9, 25) and torch.isfinite(a).all()
    assert torch.equal(a, b)


class Recorder:
    """An edit that wants no site and notes each site's name and the size it ran at."""

    def __init__(self):
        self.seen = {}

    def wants(self, site: Site) -> bool:
        self.seen[site.name] = site.res
        return False


@torch.no_grad()
def test_sites_report_the_sizes_each_level_runs_at_9x25(tiny):
    sites = tiny.unet.sites(9, 25)
    sizes = {s.level: s.res for s in sites}
    assert sizes == {0: (9, 25), 1: (5, 13), 2: (3, 7), 3: (2, 4)}   # stride-2 convs round up
    recorder = Recorder()
    tiny.unet(torch.zeros(1, 4, 9, 25), 500, tiny.text.encode(["a cat"]), edit=recorder)
    assert recorder.seen == {s.name: s.res for s in sites}


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
