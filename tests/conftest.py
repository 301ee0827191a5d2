"""Shared fixtures: the tiny random checkpoint of scripts/make_tiny.py, written once per run."""
import importlib.util
from pathlib import Path

import pytest

from models.checkpoint import load

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"


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
