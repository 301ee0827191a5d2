"""Writing results (images, labelled rows, PNG and safetensors files) and the progress bar."""

import io
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from models import InputError
from p2p import output
from p2p.output import GAP, labelled_row, save_png, save_tensors, to_pil
from p2p.progress import Progress


def _image(width, height, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_to_pil_exact_values():
    # One row of pixels per image, the same value on all three channels.
    values = torch.tensor([[-1.0, 1.0, 0.0, -2.0, 3.0, 0.5, -0.5]])
    images = values[:, None, None, :].expand(1, 3, 1, 7)  # [b, 3, h=1, w=7]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        (image,) = to_pil(images.to(dtype))
        assert image.mode == "RGB" and image.size == (7, 1)
        # 0 -> 127.5 rounds half to even: 128; 0.5 -> 191.25 -> 191; -0.5 -> 63.75 -> 64; out of range clamps.
        assert np.array(image)[0, :, 0].tolist() == [0, 255, 128, 0, 255, 191, 64]
        assert (np.array(image) == np.array(image)[:, :, :1]).all()


def test_to_pil_batch_and_channel_order():
    images = torch.full((2, 3, 2, 3), -1.0)
    images[1, 2] = 1.0  # second image blue
    first, second = to_pil(images)
    assert np.array(first).tolist() == [[[0, 0, 0]] * 3] * 2
    assert np.array(second).tolist() == [[[0, 0, 255]] * 3] * 2


def test_labelled_row_copies_images_and_writes_labels():
    a, b = _image(30, 20, 0), _image(40, 20, 1)
    row = labelled_row([a, b], ["cat", "dog"])
    assert row.mode == "RGB"
    assert row.width >= 30 + 40 and row.height > 20
    assert np.array_equal(np.array(row.crop((0, 0, 30, 20))), np.array(a))
    assert np.array_equal(np.array(row.crop((30 + GAP, 0, 70 + GAP, 20))), np.array(b))
    below_a = np.array(row.crop((0, 20, 30, row.height)))
    assert (below_a < 128).any() and (below_a == 255).any()  # dark text on white


def test_labelled_row_wraps_long_labels():
    image = _image(64, 16, 2)
    short = labelled_row([image], ["a cat"])
    long = labelled_row([image], ["a photo of a cat riding a bicycle on the moon at night"])
    assert short.width == long.width == 64
    assert long.height > short.height > 16
    assert np.array_equal(np.array(long.crop((0, 0, 64, 16))), np.array(image))


def test_save_png_round_trip(tmp_path):
    image = _image(12, 8, 3)
    metadata = {"prompt": "a cat riding a bike", "seed": "0", "edit": "café ☕ → 🐶"}
    save_png(tmp_path / "out.png", image, metadata)
    assert os.listdir(tmp_path) == ["out.png"]
    with Image.open(tmp_path / "out.png") as saved:
        assert saved.text == metadata
        assert np.array_equal(np.array(saved), np.array(image))


def test_failed_save_leaves_nothing_and_keeps_the_old_file(tmp_path, monkeypatch):
    (tmp_path / "out.png").write_bytes(b"old")

    def broken_save(self, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"\x89PNG half a file")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_png(tmp_path / "out.png", _image(4, 4, 4), {})
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_png(tmp_path / "new.png", _image(4, 4, 4), {})
    assert os.listdir(tmp_path) == ["out.png"]
    assert (tmp_path / "out.png").read_bytes() == b"old"


def test_save_errors_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="output directory does not exist: .*missing"):
        save_png(tmp_path / "missing" / "out.png", _image(4, 4, 5), {})
    (tmp_path / "a_directory").mkdir()
    with pytest.raises(InputError, match="cannot write .*a_directory"):
        save_tensors(tmp_path / "a_directory", {"x": torch.zeros(2)})
    assert os.listdir(tmp_path) == ["a_directory"] and os.listdir(tmp_path / "a_directory") == []


def test_save_tensors_round_trip(tmp_path):
    batch = torch.randn(2, 4, 3)
    tensors = {"first": batch[0], "second": batch[1], "transposed": batch[0].T, "half": batch.to(torch.bfloat16)}
    save_tensors(tmp_path / "latents.safetensors", tensors, {"prompt": "a cat", "steps": "50"})
    with safe_open(tmp_path / "latents.safetensors", "pt") as f:
        assert f.metadata() == {"prompt": "a cat", "steps": "50"}
        assert sorted(f.keys()) == sorted(tensors)
        for name, tensor in tensors.items():
            assert torch.equal(f.get_tensor(name), tensor) and f.get_tensor(name).dtype == tensor.dtype
    save_tensors(tmp_path / "plain.safetensors", {"x": torch.arange(3)})
    with safe_open(tmp_path / "plain.safetensors", "pt") as f:
        assert f.get_tensor("x").tolist() == [0, 1, 2]
    assert sorted(os.listdir(tmp_path)) == ["latents.safetensors", "plain.safetensors"]


def test_failed_save_tensors_leaves_nothing(tmp_path, monkeypatch):
    def broken_save_file(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(output, "save_file", broken_save_file)
    with pytest.raises(KeyboardInterrupt):
        save_tensors(tmp_path / "x.safetensors", {"x": torch.zeros(1)})
    assert os.listdir(tmp_path) == []


def test_progress_disabled_prints_nothing(capsys):
    assert list(Progress(range(50), enabled=False)) == list(range(50))
    assert capsys.readouterr() == ("", "")


def test_progress_in_a_log_prints_a_line_per_tenth(capsys):
    bar = Progress(range(50), desc="inverting")
    for i in bar:
        bar.set_postfix(f"loss {i}")
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == "" and len(lines) == 10 and err.endswith("\n") and "\r" not in err
    assert lines[0].startswith("inverting  5/50 [##..................]")
    assert lines[-1].startswith("inverting  50/50 [####################]") and lines[-1].endswith("loss 49")


def test_progress_without_total_prints_the_final_line(capsys):
    assert list(Progress(iter("abc"))) == ["a", "b", "c"]
    assert capsys.readouterr().err.startswith("sampling  3 ")


def test_progress_on_a_terminal_redraws_one_line(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    for i in Progress(range(50)):
        if i == 9:
            break
    drawn = sys.stderr.getvalue()
    assert drawn.count("\r") == 9 and drawn.endswith("\n") and drawn.count("\n") == 1
    assert "9/50 [###.................]" in drawn
