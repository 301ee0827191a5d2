"""The baby model as the default of every command (models.BABY), and its defaults. The trained
baby does not ship yet, so `BABY` points at the tiny random folder here."""
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from models.unet import UNet
from p2p import cli
from p2p.cli import main
from p2p.experiment import run
from tests.conftest import script


def test_no_weights_means_the_baby_said_once(tiny_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "BABY", tiny_folder)
    out = tmp_path / "edit.png"
    code = main(["edit", "--source", "a red circle and a blue square", "--target", "a red circle and a green square",
                 "--mode", "replace", "--steps", "2", "--height", "64", "--width", "64", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.count("using the baby model") == 1 and "--weights for Stable Diffusion" in err
    image = np.asarray(Image.open(out))
    assert image.shape[0] > 64 and image.shape[1] == 2 * 64 + 8     # two 64 px images, labelled below


def test_no_weights_and_no_baby_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "BABY", tmp_path / "weights" / "baby" / "baby-diffusers")
    out = tmp_path / "x.png"
    assert main(["generate", "--prompt", "a red circle", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no --weights given, and no baby model at" in err and "train_baby.py" in err
    assert not out.exists()


def test_the_babys_defaults_are_its_own_size_and_attention():
    """64 px; it attends at 8 x 8 and 4 x 4 (and 2 x 2 in the middle): the blend and the
    self-attention injection take the 4 x 4 maps, as SD v1's take 16 x 16 of 64 x 64 latents."""
    with torch.device("meta"):
        unet = UNet(script("train_baby").BABY_UNET)
    assert run.defaults(SimpleNamespace(native_size=64, unet=unet)) == {
        "height": 64, "width": 64, "blend_res": 4, "self_max_tokens": 16}
