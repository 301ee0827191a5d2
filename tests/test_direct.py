"""Direct inversion (Ju et al., 2023, "PnP Inversion"): the offsets, the source row of an edit,
the inversion file and the CLI, on the tiny checkpoint.

Measured here (128 px, 3 steps, guidance 7.5, replace + local blend): the source row of the
edit is 1.5e-4 from z0 at most with direct inversion, 9.5 with plain DDIM inversion (z0 is
0.44 at most). Sampled alone the source prompt lands on z0 to 1e-9: every offset is computed
from the point the sampler reaches. In the edit's larger batch the UNet rounds differently
(1e-5 in eps) and the random model amplifies that 7-40 times a step at guidance 7.5.
"""
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models import InputError, ddim
from models.checkpoint import load
from p2p import inversion, photo, run, sampler
from p2p.cli import main
from p2p.record import Experiment

SQUARE, BLUE = "a red square", "a blue square"


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    """A gradient with a red square, 96x80."""
    y, x = np.mgrid[0:80, 0:96]
    rgb = np.stack([x * 255 // 96, y * 255 // 80, 255 - (x + y) * 255 // 176], -1)
    rgb[20:40, 32:64] = [230, 30, 30]
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    Image.fromarray(rgb.astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def direct_file(tiny_file, picture, tmp_path_factory) -> Path:
    """A 3-step direct inversion of the photo at 64 px, written by `p2p invert`."""
    out = tmp_path_factory.mktemp("inverted") / "photo.direct.safetensors"
    assert main(["invert", "--weights", str(tiny_file), "--image", str(picture), "--prompt", SQUARE,
                 "--method", "direct", "--steps", "3", "--size", "64", "--out", str(out)]) == 0
    return out


def test_offsets_by_hand_on_a_constant_unet():
    """A UNet whose eps is the context's first entry: c for the prompt, u for "". DDIM inversion
    steps with c, sampling with g = u + w (c - u), so o_i = z*_{t-1} - step(z*_t, g)
    = step(z*_t, c) - step(z*_t, g) = k_i (c - g), k = sqrt(1 - a_prev) - sqrt(a_prev (1 - a_t) / a_t)."""
    fake = SimpleNamespace(dtype=torch.float32, prediction="epsilon",
                           unet=lambda x, t, context: context[:, :1, :1, None].expand_as(x))
    c, u, w, steps = 0.3, -0.2, 7.5, 4
    cond, null = torch.full((1, 77, 8), c), torch.full((1, 77, 8), u)
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    trajectory = inversion.ddim_inversion(fake, z0, cond, steps, progress=False)
    got = inversion.direct_offsets(fake, trajectory, cond, null, w, progress=False)
    g = u + w * (c - u)
    want = torch.stack([torch.full((4, 8, 8), ((1 - a_prev) ** 0.5 - (a_prev * (1 - a_t) / a_t) ** 0.5) * (c - g))
                        for _, a_t, a_prev in ddim.schedule(steps)])
    assert got.shape == (steps, 4, 8, 8) and torch.allclose(got, want, atol=1e-6)
    x = trajectory[-1]                          # and the offsets walk the sampler back onto the trajectory
    for i, (t, a_t, a_prev) in enumerate(ddim.schedule(steps)):
        x = ddim.ddim_step(x, torch.full_like(x, g), a_t, a_prev)[0] + got[i]
        assert torch.allclose(x, trajectory[steps - i - 1], atol=1e-6)


def test_the_source_row_of_an_edit_retraces_the_photo(tiny, tiny_file, picture, tmp_path):
    error, result = {}, {}
    for method in ("direct", "ddim"):
        record = Experiment(source=SQUARE, targets=(BLUE,), mode="replace", blend=(("red",), ("blue",)),
                            steps=3, height=128, width=128, image=str(picture), method=method)
        result[method] = run.run(tiny, run.prepare(record, tiny_file, cache_dir=tmp_path), progress=False)
        z0 = result[method].inversion.z0
        error[method] = (result[method].latents[:1] - z0).abs().max().item()
    print(f"source row - z0, max: direct {error['direct']:.2e}, ddim {error['ddim']:.2e}")
    assert error["direct"] < 1e-2 and error["ddim"] > 1       # measured 1.5e-4 and 9.5
    inv, latents = result["direct"].inversion, result["direct"].latents
    assert inv.null_embeddings is None and inv.direct_offsets.shape == (3, 4, 16, 16)
    assert (latents[1] - latents[0]).abs().max() > 1e-2      # the target is edited
    alone = photo.reconstruct(tiny, inv)                     # no edit, a batch of one: z0 to rounding
    assert (alone - inv.z0).abs().max() < 1e-6               # measured 9e-10


def test_with_the_network_in_float64_the_source_row_of_a_10_step_edit_is_z0(tiny_file, picture, tmp_path):
    """Exact by construction: in float64 the batch's rounding stays below float32's (the
    sampler's), so 10 steps of a blended edit end on z0 as sampling the source alone does."""
    sd = load(tiny_file, dtype=torch.float64)
    record = Experiment(source=SQUARE, targets=(BLUE,), mode="replace", blend=(("red",), ("blue",)), steps=10,
                        height=128, width=128, image=str(picture), method="direct")
    result = run.run(sd, run.prepare(record, tiny_file, cache_dir=tmp_path), progress=False)
    assert (result.latents[0] - result.inversion.z0[0]).abs().max() < 1e-8     # measured 9.3e-10
    assert (result.latents[1] - result.latents[0]).abs().max() > 1e-2


def test_plms_refuses_direct_offsets(tiny):
    with pytest.raises(InputError) as e:
        sampler.generate(tiny, [SQUARE], steps=3, height=64, width=64, source_offsets=torch.zeros(3, 4, 8, 8),
                         sampler="plms", progress=False)
    assert "offsets belong to DDIM" in str(e.value) and "\n" not in str(e.value)


def test_invert_direct_then_edit_from_the_file(tiny_file, picture, direct_file, tmp_path, capsys):
    tensors = load_file(direct_file)
    with safe_open(str(direct_file), "pt") as f:
        meta = f.metadata()
    assert tensors["direct_offsets"].shape == (3, 4, 8, 8) and "null_embeddings" not in tensors
    assert meta["method"] == "direct" and meta["guidance"] == "7.5" and meta["inner_steps"] == ""
    lat = tmp_path / "e.safetensors"
    code = main(["edit", "--weights", str(tiny_file), "--image", str(picture), "--inversion", str(direct_file),
                 "--source", SQUARE, "--target", BLUE, "--mode", "replace", "--steps", "3", "--height", "64",
                 "--width", "64", "--out", str(tmp_path / "e.png"), "--latents-out", str(lat)])
    err = capsys.readouterr().err
    assert code == 0 and "direct offsets" not in err, err       # nothing inverted: the file has it all
    assert Image.open(tmp_path / "e.png").text["inversion_method"] == "direct"
    assert (load_file(lat)["latents"][0] - tensors["z0"][0]).abs().max() < 1e-2


def test_the_direct_file_round_trips_and_is_checked(tiny_file, picture, direct_file, tmp_path, capsys):
    inv = inversion.read(direct_file)
    inversion.save(tmp_path / "again.safetensors", inv)
    again = inversion.read(tmp_path / "again.safetensors")
    assert again.settings == inv.settings and again.null_embeddings is None
    assert all(torch.equal(getattr(again, k), getattr(inv, k)) for k in ("x_T", "z0", "direct_offsets"))
    tensors = load_file(direct_file)
    with safe_open(str(direct_file), "pt") as f:
        meta = f.metadata()
    save_file({k: v for k, v in tensors.items() if k != "direct_offsets"}, tmp_path / "bare.safetensors", meta)
    with pytest.raises(InputError, match="is not a p2p inversion file .it lacks direct_offsets"):
        inversion.read(tmp_path / "bare.safetensors")
    save_file({**tensors, "direct_offsets": tensors["direct_offsets"][:2]}, tmp_path / "short.safetensors", meta)
    with pytest.raises(InputError, match="tensor shapes do not match its 64x64 px, 3-step metadata"):
        inversion.read(tmp_path / "short.safetensors")
    code = main(["edit", "--weights", str(tiny_file), "--image", str(picture), "--inversion", str(direct_file),
                 "--source", SQUARE, "--target", BLUE, "--mode", "replace", "--steps", "3", "--height", "64",
                 "--width", "64", "--guidance", "5", "--out", str(tmp_path / "e.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "was made with guidance '7.5', not '5.0'" in err and "direct offsets" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "e.png").exists()
