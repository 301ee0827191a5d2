"""Writing results (images, labelled rows, PNG and safetensors files) and the progress bar."""

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont
from safetensors import safe_open

from models import InputError
from p2p.experiment import output
from p2p.experiment.output import save_png, save_tensors
from p2p import viz
from p2p.viz import GAP, labelled_row, to_pil


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
        # truncated as the notebooks' astype(np.uint8): 0 -> 127.5 -> 127; 0.5 -> 191.25 -> 191;
        # -0.5 -> 63.75 -> 63; out of range clamps
        assert np.array(image)[0, :, 0].tolist() == [0, 255, 127, 0, 255, 191, 63]
        assert (np.array(image) == np.array(image)[:, :, :1]).all()
        (rounded,) = to_pil(images.to(dtype), truncate=False)   # 127.5 rounds half to even: 128
        assert np.array(rounded)[0, :, 0].tolist() == [0, 255, 128, 0, 255, 191, 64]


def test_to_pil_truncates_as_numpy_does_and_rounds_photos_back_to_their_pixels():
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2.2 - 1.1
    notebook = ((x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)[0]
    assert np.array_equal(np.array(to_pil(x)[0]), notebook)
    photo = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 3, 16, 16)
    (back,) = to_pil(photo.float() / 127.5 - 1, truncate=False)
    assert np.array_equal(np.array(back)[..., 0], photo[0, 0].numpy())
    # float64 stays float64: a [0, 1] image (the metrics' as_pil) rounds as x * 255 does, even 1e-6
    # from a half, which float32 cannot tell apart
    y = torch.tensor([1.5 - 1e-6, 1.5 + 1e-6, 100.5 - 1e-6, 100.5 + 1e-6], dtype=torch.float64) / 255
    (near,) = to_pil(y.reshape(1, 1, 1, 4).expand(1, 3, 1, 4) * 2 - 1, truncate=False)
    assert np.array(near)[0, :, 0].tolist() == (y * 255).round().tolist() == [1, 2, 100, 101]


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
    def broken_write_bytes(self, data):
        with open(self, "wb") as f:
            f.write(data[:4])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_bytes", broken_write_bytes)
    with pytest.raises(KeyboardInterrupt):
        save_tensors(tmp_path / "x.safetensors", {"x": torch.zeros(1)})
    assert os.listdir(tmp_path) == []


# ---- file types, checks before the work, failures, permissions, determinism ------------------

METADATA = {"prompt": "a vélo 自転車 🚲", "seed": "0", "steps": "50"}


def test_save_image_writes_the_format_its_suffix_names(tmp_path):
    x, y = np.meshgrid(np.arange(12), np.arange(8))
    image = Image.fromarray(np.stack([x * 20, y * 30, x * 5 + y * 10], axis=-1).astype(np.uint8))  # smooth
    quality_95 = io.BytesIO()
    image.save(quality_95, format="JPEG", quality=95)
    for name, magic, form in [("a.png", b"\x89PNG", "PNG"), ("b.jpg", b"\xff\xd8\xff", "JPEG"),
                              ("c.JPEG", b"\xff\xd8\xff", "JPEG"), ("d.webp", b"RIFF", "WEBP")]:
        output.save_image(tmp_path / name, image, METADATA)
        assert (tmp_path / name).read_bytes().startswith(magic), name
        with Image.open(tmp_path / name) as saved:
            assert saved.format == form and saved.size == (12, 8)
            pixels = np.array(saved.convert("RGB")).astype(int)
            if form == "PNG":
                assert saved.text == METADATA
            elif form == "JPEG":
                assert json.loads(saved.info["comment"].decode("utf-8")) == METADATA
                assert saved.quantization == Image.open(quality_95).quantization
                assert saved.info["comment"].startswith('{"prompt": "a vélo 自転車 🚲"'.encode())  # raw UTF-8
            else:
                assert json.loads(saved.getexif()[output.EXIF_IMAGE_DESCRIPTION]) == METADATA
        if form == "JPEG":  # lossy: close, not equal
            assert np.abs(pixels - np.array(image)).mean() < 8
        else:
            assert np.array_equal(pixels, np.array(image))
    assert sorted(os.listdir(tmp_path)) == ["a.png", "b.jpg", "c.JPEG", "d.webp"]


def test_save_image_refuses_other_suffixes(tmp_path):
    for name in ("x.gif", "x", "x.safetensors"):
        with pytest.raises(InputError) as caught:
            output.save_image(tmp_path / name, _image(4, 4, 7), {})
        assert str(caught.value) == f"{tmp_path / name}: image outputs are .png, .jpg, .jpeg or .webp"
    assert os.listdir(tmp_path) == []


def test_check_output_suffixes(tmp_path):
    for name in ("a.png", "a.jpg", "a.jpeg", "a.webp", "a.PNG"):
        output.check_output(tmp_path / name, "image")
    output.check_output(tmp_path / "a.safetensors", "tensors")
    assert os.listdir(tmp_path) == []  # the probe leaves nothing behind
    with pytest.raises(InputError) as caught:
        output.check_output(tmp_path / "x.gif", "image")
    assert str(caught.value) == f"{tmp_path / 'x.gif'}: image outputs are .png, .jpg, .jpeg or .webp"
    with pytest.raises(InputError) as caught:
        output.check_output(tmp_path / "i.png", "tensors")
    assert str(caught.value) == f"{tmp_path / 'i.png'}: this output is a safetensors file: name it .safetensors"


def test_check_output_refuses_what_could_not_be_written(tmp_path, monkeypatch):
    with pytest.raises(InputError) as caught:
        output.check_output(tmp_path / "missing" / "a.png", "image")
    assert str(caught.value) == f"output directory does not exist: {tmp_path / 'missing'}"
    (tmp_path / "d.png").mkdir()
    with pytest.raises(InputError, match=r"^cannot write .*d\.png: it is a directory$"):
        output.check_output(tmp_path / "d.png", "image")
    # Too long a name fails for every user, root included; 255 bytes is the usual limit.
    long = tmp_path / ("x" * 300 + ".safetensors")
    with pytest.raises(InputError) as caught:
        output.check_output(long, "tensors")
    assert str(caught.value) == f"cannot write {long}: File name too long"

    def refused(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", refused)
    with pytest.raises(InputError) as caught:
        output.check_output(tmp_path / "a.png", "image")
    assert str(caught.value) == f"cannot write {tmp_path / 'a.png'}: Permission denied"
    assert os.listdir(tmp_path) == ["d.png"]


def test_check_output_read_only_directory(tmp_path):
    """A 0555 directory; root writes there anyway, so for root a folder of /proc, where no file can be made."""
    folder, reason = (tmp_path / "ro", "Permission denied") if os.geteuid() else (Path("/proc/self"), "No such file")
    folder.mkdir(mode=0o555, exist_ok=True)
    with pytest.raises(InputError, match=rf"^cannot write .*a\.png: {reason}"):
        output.check_output(folder / "a.png", "image")


def test_failed_tensor_writes_are_input_errors_and_leave_nothing(tmp_path, monkeypatch):
    long = tmp_path / ("x" * 300 + ".safetensors")
    with pytest.raises(InputError) as caught:
        save_tensors(long, {"x": torch.zeros(2)})
    assert str(caught.value) == f"cannot write {long}: File name too long"

    def full_disk(self, data):
        with open(self, "wb") as f:
            f.write(data[:10])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(InputError) as caught:
        save_tensors(tmp_path / "x.safetensors", {"x": torch.zeros(2)}, {"a": "b"})
    assert str(caught.value) == f"cannot write {tmp_path / 'x.safetensors'}: No space left on device"
    assert os.listdir(tmp_path) == []


def test_every_output_gets_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        for umask, mode in [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)]:
            os.umask(umask)
            folder = tmp_path / oct(umask)
            folder.mkdir()
            save_tensors(folder / "a.safetensors", {"x": torch.zeros(2)}, {"k": "v"})
            assert (folder / "a.safetensors").stat().st_mode & 0o777 == mode, oct(umask)
            for name in ("a.png", "a.jpg", "a.webp"):
                output.save_image(folder / name, _image(4, 4, 8), {"k": "v"})
            assert len(os.listdir(folder)) == 4
            for name in os.listdir(folder):
                assert (folder / name).stat().st_mode & 0o777 == mode, (name, oct(umask))
    finally:
        os.umask(old)


def test_save_tensors_is_byte_for_byte_deterministic(tmp_path):
    tensors = {"zeta": torch.arange(6.0).reshape(2, 3), "Alpha": torch.ones(3, dtype=torch.float16),
               "mid": torch.tensor([7, 8], dtype=torch.int64)}
    metadata = {f"key{i}": f"value {i}" for i in range(12)} | {"prompt": "vélo 自転車"}
    backwards = dict(reversed(list(metadata.items())))
    files = []
    for i, md in enumerate([metadata, backwards, metadata, backwards]):
        save_tensors(tmp_path / f"{i}.safetensors", tensors, md)
        files.append((tmp_path / f"{i}.safetensors").read_bytes())
    assert all(f == files[0] for f in files)
    data = files[0]
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n]
    assert n % 8 == 0 and "vélo 自転車".encode() in header and b"\\u" not in header
    parsed = json.loads(header)
    assert header.rstrip(b" ") == json.dumps(parsed, sort_keys=True, separators=(",", ":"),
                                             ensure_ascii=False).encode()
    assert list(parsed["__metadata__"]) == sorted(metadata)
    with safe_open(tmp_path / "0.safetensors", "pt") as f:
        assert f.metadata() == metadata
        assert sorted(f.keys()) == sorted(tensors)
        for name, tensor in tensors.items():
            assert torch.equal(f.get_tensor(name), tensor) and f.get_tensor(name).dtype == tensor.dtype


# ---- labels: fonts with wide coverage, at most three lines --------------------------------

def _has_dejavu():
    try:
        ImageFont.truetype("DejaVuSans.ttf", 15)
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_dejavu(), reason="DejaVu Sans is not installed")
def test_labels_draw_accented_letters():
    image = _image(80, 16, 9)
    drawn, boxed = (np.array(labelled_row([image], [label])) for label in ("vélo", "v\uffffl" + "o"))
    assert drawn.shape == boxed.shape and not np.array_equal(drawn, boxed)  # é is not the missing-glyph box
    assert (drawn[16:] < 128).any()  # something dark was drawn under the image
    assert viz._label_font("vélo").path.endswith("DejaVuSans.ttf")


def test_long_labels_stop_at_three_lines():
    image = _image(64, 16, 10)
    label = " ".join(["bicycle"] * 40)
    three = labelled_row([image], ["bicycle bicycle bicycle"])  # one word a line at 64 pixels
    assert labelled_row([image], [label]).height == three.height
    font = viz._label_font(label)
    lines = viz._wrap(label, font, 64)
    assert len(lines) == 3 and lines[:2] == ["bicycle"] * 2 and lines[2].endswith("…")
    assert font.getlength(lines[2]) <= 64
    assert three.height == 16 + GAP + 3 * (font.getbbox("Ag")[3] + 4) + GAP
    assert viz._wrap("a cat", font, 64) == ["a cat"]


def test_progress_bars_are_tqdm_bars_on_stderr(tiny, capsys):
    from p2p.sampler import generate
    generate(tiny, ["a cat"], steps=4, height=64, width=64, sampler="plms")
    out, err = capsys.readouterr()
    assert out == "" and "sampling: 100%" in err and "5/5 [" in err and err.endswith("\n")
    generate(tiny, ["a cat"], steps=4, height=64, width=64, progress=False)
    assert capsys.readouterr() == ("", "")
