"""Shared fixtures: the tiny random checkpoint of scripts/make_tiny.py, written once per run."""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from models.checkpoint import load

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"

# torch caps OMP_NUM_THREADS at the core count, so on a 2-core machine OMP_NUM_THREADS=3 would
# still run 2 threads and hide how a bigger machine splits (and rounds) a batch. Take it exactly.
if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def script(name: str):
    """Import a file of scripts/ as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    script("make_tiny").main([str(out)])
    return out


@pytest.fixture(scope="session")
def tiny_file(tiny_dir) -> Path:
    return tiny_dir / "tiny.safetensors"


@pytest.fixture(scope="session")
def tiny_folder(tiny_dir) -> Path:
    return tiny_dir / "tiny-diffusers"


@pytest.fixture(scope="session")
def tiny(tiny_file):
    """The tiny model, loaded once from the single file (fp32, CPU); do not modify it."""
    return load(tiny_file)


@pytest.fixture(scope="session")
def nets(tmp_path_factory):
    """Tiny random CLIP and DINO ViT, written by transformers as the metrics' folders."""
    import torch
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel
    from p2p.eval import metrics
    folder = tmp_path_factory.mktemp("nets")
    with torch.random.fork_rng():   # seeded weights, the global generator left as it was
        torch.manual_seed(0)
        make(folder, CLIPModel, CLIPConfig, ViTModel, ViTConfig, metrics)
    return folder


def make(folder, CLIPModel, CLIPConfig, ViTModel, ViTConfig, metrics):
    clip = CLIPModel(CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4),
                                vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                   num_attention_heads=4, image_size=64, patch_size=16),
                                projection_dim=16))
    clip.save_pretrained(folder / metrics.CLIP_FOLDER, safe_serialization=True)
    dino = ViTModel(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8), add_pooling_layer=False)
    dino.save_pretrained(folder / metrics.DINO_FOLDER, safe_serialization=True)
