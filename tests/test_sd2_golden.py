"""The tiny SD 2-shaped checkpoint (scripts/make_tiny.py --sd2) against the goldens that
scripts/make_golden_sd2.py made with diffusers and transformers: the OpenCLIP text tower, the
UNet with linear projections and 64-wide heads, and 10-step generation reading the UNet's
output as eps and as v, in both layouts (the acceptance run: within 1e-3)."""
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from models.checkpoint import load
from p2p.cli import main

from conftest import GOLDEN, script
from test_golden import assert_close, read_golden

make_tiny = script("make_tiny")


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """{"file": the single file, "folder": the folder, "folder-v": the folder whose scheduler says v}."""
    out = tmp_path_factory.mktemp("sd2")
    make_tiny.main([str(out), "--sd2"])
    folder, v = out / "tiny-sd2-diffusers", out / "tiny-sd2-diffusers-v"
    shutil.copytree(folder, v, copy_function=os.link)             # the same weight files, hard-linked
    config = v / "scheduler" / "scheduler_config.json"
    text = config.read_text()
    config.unlink()                                               # a link: write a new file, not through it
    config.write_text(text.replace('"epsilon"', '"v_prediction"'))
    return {"file": out / "tiny-sd2.safetensors", "folder": folder, "folder-v": v}


@pytest.fixture(scope="module")
def golden(layouts):
    return read_golden(GOLDEN / "sd2.safetensors", layouts["folder"])


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_text_encoder_and_unet(golden, layouts, layout):
    sd = load(layouts[layout], prediction="epsilon")
    assert torch.equal(sd.text.tokenize(golden["meta"]["prompts"]), golden["text.ids"])   # padded with "!" (id 0)
    hidden = sd.text.encode(golden["meta"]["prompts"])
    assert_close(hidden, golden["text.hidden"], f"{layout}: text encoder")
    context = golden["text.hidden"][[0, 2]]
    with torch.no_grad():
        for t in golden["meta"]["unet_timesteps"]:
            assert_close(sd.unet(golden["unet.x"], t, context), golden[f"unet.out.{t}"], f"{layout}: UNet at t={t}")


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_p2p_generate_reproduces_the_reference_in_both_layouts(golden, layouts, prediction, tmp_path):
    case, size = golden["meta"]["e2e"], golden["meta"]["size"]
    # a single file is told; a folder reads its scheduler config, or is overridden
    runs = {"file": ["--prediction", prediction], "folder": []} if prediction == "epsilon" else \
        {"file": ["--prediction", prediction], "folder": ["--prediction", prediction], "folder-v": []}
    latents = []
    for name, extra in runs.items():
        argv = ["generate", "--weights", str(layouts[name]), *extra, "--seed", str(case["seed"]),
                "--steps", str(case["steps"]), "--guidance", golden["meta"]["guidance"], "--height", size,
                "--width", size, "--out", str(tmp_path / f"{name}.png"),
                "--latents-out", str(tmp_path / f"{name}.safetensors")]
        for prompt in case["prompts"]:
            argv += ["--prompt", prompt]
        assert main(argv) == 0
        latents.append(load_file(str(tmp_path / f"{name}.safetensors"))["latents"])
        assert_close(latents[-1], golden[f"e2e.{prediction}"], f"{name} ({prediction})", atol=1e-3)
        print(f"{name} {prediction}: max abs error {(latents[-1] - golden[f'e2e.{prediction}']).abs().max():.3g}, "
              f"max |x| {golden[f'e2e.{prediction}'].abs().max():.3g}")
    assert all(torch.equal(latents[0], x) for x in latents[1:])
    other = "v_prediction" if prediction == "epsilon" else "epsilon"
    assert (golden[f"e2e.{other}"] - latents[0]).abs().max() > 1e-2    # reading the output as the other kind fails


def test_a_null_text_inversion_and_a_replace_edit_of_a_photo_on_v_prediction(layouts, tmp_path, capsys):
    from PIL import Image
    Image.new("RGB", (80, 64), (200, 40, 40)).save(tmp_path / "red.png")
    inv = tmp_path / "red.inversion.safetensors"
    assert main(["invert", "--weights", str(layouts["folder-v"]), "--image", str(tmp_path / "red.png"),
                 "--prompt", "a red square", "--method", "null-text", "--steps", "2", "--inner-steps", "1",
                 "--size", "64", "--out", str(inv)]) == 0, capsys.readouterr().err
    assert main(["edit", "--weights", str(layouts["folder-v"]), "--image", str(tmp_path / "red.png"),
                 "--inversion", str(inv), "--source", "a red square", "--target", "a blue square",
                 "--mode", "replace", "--steps", "2", "--height", "64", "--width", "64", "--blend-res", "8",
                 "--out", str(tmp_path / "blue.png")]) == 0, capsys.readouterr().err
    assert (tmp_path / "blue.png").is_file()
    # the same weights read as eps (the folder whose scheduler says epsilon) must not reuse it
    capsys.readouterr()
    assert main(["edit", "--weights", str(layouts["folder"]), "--image", str(tmp_path / "red.png"),
                 "--inversion", str(inv), "--source", "a red square", "--target", "a blue square",
                 "--mode", "replace", "--steps", "2", "--height", "64", "--width", "64", "--blend-res", "8",
                 "--out", str(tmp_path / "wrong.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("was made with prediction 'v_prediction', not 'epsilon': the UNet's output must be read as "
                        "it was when inverting (--prediction)") and "\n" not in err
    assert not (tmp_path / "wrong.png").exists()
