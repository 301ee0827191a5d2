"""p2p/eval/metrics.py on hand-computed cases and against scikit-image's values (tests/golden/metrics.json)."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from models import InputError
from p2p.eval import metrics

from conftest import GOLDEN, script


def test_mse_and_psnr_by_hand():
    a, b = torch.zeros(3, 4, 4), torch.zeros(3, 4, 4)
    b[1, 2, 3] = 1.0                                       # one channel of one pixel
    assert metrics.mse(a, b) == pytest.approx(1 / 48)
    region = torch.zeros(4, 4, dtype=torch.bool)
    region[2, 3] = True                                    # the changed pixel is the edit region
    assert metrics.mse(a, b, region) == 0 and metrics.psnr(a, b, region) == math.inf
    assert metrics.psnr(a, a + 0.1) == pytest.approx(20.0)     # MSE 0.01
    everything = torch.ones(4, 4, dtype=torch.bool)       # no background left to compare
    assert math.isnan(metrics.mse(a, b, everything)) and math.isnan(metrics.psnr(a, b, everything))


def test_ssim_by_hand():
    x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert metrics.ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    # constant images: no variance, so ssim = (2 ab + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.2, 0.4, 0.01 ** 2
    assert metrics.ssim(torch.full((3, 12, 12), a, dtype=torch.float64), torch.full((3, 12, 12), b, dtype=torch.float64)) == \
        pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=1e-12)
    assert metrics.ssim_map(x, x).shape == (3, 6, 6)       # the 11x11 window's valid positions
    assert metrics.gaussian_window().sum().item() == pytest.approx(1.0)


def test_psnr_and_ssim_match_scikit_image():
    golden, make = json.loads((GOLDEN / "metrics.json").read_text()), script("make_golden_metrics")
    for case in golden["cases"]:
        a, b = (torch.from_numpy(x) for x in make.pair(case["seed"], case["height"], case["width"]))
        assert metrics.psnr(a, b) == pytest.approx(case["psnr"], abs=1e-9)
        assert metrics.ssim(a, b) == pytest.approx(case["ssim"], abs=1e-9)


def test_masked_ssim_averages_the_background_only():
    x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[:, :16] = 1 - y[:, :16]                             # the top half changes
    region = torch.zeros(32, 32, dtype=torch.bool)
    region[:16] = True
    s = metrics.ssim_map(x, y)[:, 11:, :]                 # map rows 11.. are image rows 16..
    assert metrics.ssim(x, y, region) == pytest.approx(s.mean().item())
    assert metrics.ssim(x, y, region) > metrics.ssim(x, y)


def test_locality():
    a = torch.zeros(3, 4, 4)
    b = a.clone()
    b[:, 0, 0], b[:, 3, 3] = 1.0, 0.5                      # change 3 inside, 1.5 outside
    region = torch.zeros(4, 4, dtype=torch.bool)
    region[0, 0] = True
    assert metrics.locality(a, b, region) == pytest.approx(3 / 4.5)
    assert math.isnan(metrics.locality(a, a, region))


def test_attention_region_and_pil_images():
    region = metrics.attention_region(torch.tensor([[1.0, 0.2], [0.5, 0.0]]), (4, 4), threshold=0.3)
    assert region.tolist() == [[True, True, False, False]] * 4
    pixels = np.zeros((16, 16, 3), dtype=np.uint8)
    pixels[0, 0] = 255
    assert metrics.mse(Image.fromarray(pixels), np.zeros_like(pixels)) == pytest.approx(3 / (3 * 256))
    with pytest.raises(InputError, match="does not fit"):
        metrics.mse(pixels, pixels, torch.zeros(3, 3, dtype=torch.bool))
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[0, 0] = True
    got = metrics.pixel_metrics(Image.fromarray(pixels), np.zeros_like(pixels), inside)
    # the background is untouched, though SSIM windows near the region see into it
    assert got == {"mse": 0.0, "psnr": math.inf, "ssim": pytest.approx(1.0, abs=1e-4), "locality": 1.0}
    assert got["ssim"] < 1


# ---- CLIP and DINO, on tiny random models written by transformers (the real layouts) -----------

def normalised(image: Image.Image, mean, std) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255
    return ((x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])[None]


def test_clip_score_and_direction(nets, tmp_path):
    clip = metrics.Clip.load(nets / metrics.CLIP_FOLDER)
    a = torch.rand(3, 80, 96, generator=torch.Generator().manual_seed(0))
    b = torch.rand(3, 80, 96, generator=torch.Generator().manual_seed(1))
    # by hand: 80 x 96 -> 64 x int(76.8) bicubic, the 64 px centre crop, CLIP's normalisation, the two
    # towers, 100 * max(cos, 0)
    crop = metrics.as_pil(a).resize((76, 64), Image.BICUBIC).crop((6, 0, 70, 64))
    with torch.no_grad():   # transformers' own forward: logits_per_image = exp(logit_scale) * cos
        pixels = normalised(crop, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
        ids = clip.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        out = clip.model(input_ids=ids, pixel_values=pixels)
    cos = (out.logits_per_image / clip.model.logit_scale.exp()).item()
    assert clip.score(a, "a cat") == pytest.approx(100 * max(cos, 0), abs=1e-4)
    assert 0 <= clip.score(b, "a dog") <= 100
    got = clip.measure(a, b, "a cat", "a dog")
    d = got["clip_direction"]
    assert got["clip_score"] == pytest.approx(clip.score(b, "a dog"))
    assert -1 <= d <= 1 and clip.measure(a, b, "a dog", "a cat")["clip_direction"] == pytest.approx(-d, abs=1e-5)
    assert math.isnan(clip.measure(a, a, "a cat", "a dog")["clip_direction"])
    # a preprocessor_config.json beside the weights (the hub's older format) is the one used
    folder = tmp_path / "clip"
    folder.mkdir()
    for f in (nets / metrics.CLIP_FOLDER).iterdir():
        (folder / f.name).symlink_to(f)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": 64, "size": 64, "do_center_crop": True, "do_normalize": True, "do_resize": True,
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3,
         "feature_extractor_type": "CLIPFeatureExtractor"}))
    other = metrics.Clip.load(folder)
    assert list(other.preprocess.image_mean) == [0.5] * 3 and other.score(a, "a cat") != clip.score(a, "a cat")


def test_dino_structure_distance(nets):
    dino = metrics.Dino.load(nets / metrics.DINO_FOLDER)
    a = torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(0))
    s = dino.self_similarity(a)
    assert s.shape == (1 + 16, 1 + 16)                      # the class token and 4x4 patches of 8 px at 32 px
    assert torch.allclose(s.diagonal(), torch.ones(17), atol=1e-5) and torch.allclose(s, s.T)
    assert dino.distance(a, a) == 0
    # the keys of a plain forward pass, caught by a hook on the last layer's key projection
    last = (dino.model.layers if hasattr(dino.model, "layers") else dino.model.encoder.layer)[-1]
    key = last.attention.k_proj if hasattr(last.attention, "k_proj") else last.attention.attention.key
    caught = []
    handle = key.register_forward_hook(lambda module, args, output: caught.append(output[0]))
    with torch.no_grad():
        dino.model(pixel_values=normalised(metrics.as_pil(a).resize((32, 32), Image.BICUBIC),
                                           (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    handle.remove()
    k = torch.nn.functional.normalize(caught[0], dim=-1)
    assert torch.allclose(s, k @ k.T, atol=1e-5)
    assert dino.pixels(torch.rand(3, 40, 52)).shape == (1, 3, 32, 41)   # the long side int(41.6), not cropped
    b = a.flip(-1)
    assert dino.distance(a, b) > 0 and dino.distance(a, b) == pytest.approx(dino.distance(b, a))


def test_absent_metric_weights_are_a_note(tmp_path, capsys):
    assert metrics.Clip.load(tmp_path / metrics.CLIP_FOLDER) is None
    assert metrics.Dino.load(tmp_path / metrics.DINO_FOLDER) is None
    err = capsys.readouterr().err
    assert "note: CLIP score skipped: no safetensors model in" in err
    assert "p2p download --repo openai/clip-vit-large-patch14" in err and "facebook/dino-vitb8" in err
