"""scripts/train_baby.py at a tiny config: finite losses, a resumed run equal bit for bit to an
unbroken one, and an export both loaders read to the same UNet."""
import dataclasses

import pytest
import torch
from PIL import Image

from models.checkpoint import load
from models.unet import UNetConfig
from models.vae import VAEConfig
from p2p import viz
from p2p.cli import main as p2p_main
from tests.conftest import script

tb = script("train_baby")
TINY = tb.Plan(vae_steps=4, unet_steps=4, batch=2, vae_batch=2, size=32, warmup=2,
               unet=UNetConfig(channels=(32, 32), attention=(True, False), context_dim=64),
               vae=VAEConfig(channels=(32, 32, 32, 32), layers_per_block=1), text=dict(width=64, layers=1, mlp=64))


def tensors(out):
    return tb.read_checkpoint(out / "train" / "checkpoint.safetensors")[0]


def steps_logged(err: str, phase: str) -> list[int]:
    return [int(line.split()[1].split("/")[0]) for line in err.splitlines() if line.startswith(phase + " ")]


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    out = tmp_path_factory.mktemp("unbroken")
    tb.train(out, TINY, log_every=1)
    return out


def test_resumed_run_equals_unbroken_run(unbroken, tmp_path, capfd):
    tb.train(tmp_path, dataclasses.replace(TINY, unet_steps=0), log_every=1)             # VAE 2 of 4
    tb.train(tmp_path, dataclasses.replace(TINY, vae_steps=4, unet_steps=2), log_every=1)  # VAE 3..4, UNet 1..2
    capfd.readouterr()
    tb.train(tmp_path, TINY, log_every=1)                                                   # UNet 3..4
    err = capfd.readouterr().err
    assert "resuming unet at step 2" in err and steps_logged(err, "unet") == [3, 4]
    a, b = tensors(tmp_path), tensors(unbroken)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert len(a["loss.vae"]) == len(a["loss.unet"]) == 4 and torch.isfinite(a["loss.unet"]).all()


def test_vae_steps_of_a_resumed_run_are_checked(unbroken):
    with pytest.raises(tb.InputError, match="frozen"):
        tb.train(unbroken, dataclasses.replace(TINY, vae_steps=5))
    with pytest.raises(tb.InputError, match="batch"):
        tb.train(unbroken, dataclasses.replace(TINY, batch=3))


def test_export_loads_in_both_layouts_alike(unbroken, capsys):
    single, folder = tb.export(unbroken)
    a, b = load(single), load(folder)
    assert b.native_size == 32 and a.native_size == 512   # a single file cannot say its size
    assert a.vae.cfg.scale == b.vae.cfg.scale == 0.18215
    x, context = torch.randn(1, 4, 4, 4), torch.randn(1, 77, 64)
    assert torch.equal(a.unet(x, 500, context), b.unet(x, 500, context))
    ids = a.text.tokenize(["a red circle"])
    assert torch.equal(a.text.model(input_ids=ids).last_hidden_state, b.text.model(input_ids=ids).last_hidden_state)
    assert (unbroken / "README.md").read_text().count("data seed 0") == 1 and (unbroken / "loss.png").stat().st_size
    assert Image.open(unbroken / "samples.png").size[0] == 4 * 2 * TINY.size + 3 * viz.GAP   # 4 a row, twice their size
    assert p2p_main(["generate", "--weights", str(folder), "--prompt", "a red circle", "--height", "32", "--width",
                     "32", "--steps", "2", "--out", str(unbroken / "x.png")]) == 0


def test_scale_fold_keeps_the_autoencoder():
    run = tb.Run(TINY, "cpu")
    images = tb.batch_of(TINY, 0, 2, "cpu")[0]
    with torch.no_grad():
        before = run.vae.decode(run.vae.encode(images))
        tb.fold_scale(run, batches=1)
        after = run.vae.decode(run.vae.encode(images))
        mean, logvar = run.vae.posterior(tb.batch_of(TINY, 0, TINY.batch, "cpu")[0])
    z = (mean + (0.5 * logvar).exp() * torch.randn(mean.shape)) * run.vae.cfg.scale   # as the UNet trains on
    assert torch.allclose(before, after, atol=1e-4)
    assert run.scale_data > 0 and abs(z.std().item() - 1) < 0.2
