"""Writing results: image tensors to PIL, a labelled row of images, PNGs and safetensors files."""

import os
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import save_file

from models import InputError

GAP = 8  # pixels between images, and around the labels below them


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[b, 3, h, w] in [-1, 1], any dtype or device -> b PIL RGB images."""
    pixels = ((images.detach().float().cpu() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in pixels]  # [h, w, 3] each


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=15)
    except TypeError:  # Pillow < 10.1 only has its small fixed-size bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels; a single word wider than that keeps its own line."""
    lines = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def labelled_row(images: list[Image.Image], labels: list[str]) -> Image.Image:
    """The images side by side on white, each with its label centred below it."""
    font = _font()
    line_height = font.getbbox("Ag")[3] + 4
    wrapped = [_wrap(label, font, image.width) for image, label in zip(images, labels, strict=True)]
    width = sum(image.width for image in images) + GAP * (len(images) - 1)
    top = max(image.height for image in images) + GAP  # where the labels start
    row = Image.new("RGB", (width, top + line_height * max(map(len, wrapped)) + GAP), "white")
    draw = ImageDraw.Draw(row)
    x = 0
    for image, lines in zip(images, wrapped):
        row.paste(image.convert("RGB"), (x, 0))
        for i, line in enumerate(lines):
            draw.text((x + (image.width - font.getlength(line)) / 2, top + i * line_height), line, fill="black", font=font)
        x += image.width + GAP
    return row


def _write_atomically(path: Path, write) -> None:
    """Call write(temp) on a file beside `path`, then rename it into place; on failure leave no file."""
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"output directory does not exist: {path.parent}")
    # A plain name rather than mkstemp, so the result gets the usual umask permissions, not 0600.
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temp)
        os.replace(temp, path)
    except OSError as error:  # unwritable directory, disk full, path is a directory, ...
        temp.unlink(missing_ok=True)
        raise InputError(f"cannot write {path}: {error.strerror or error}") from error
    except BaseException:  # any other failure, Ctrl-C included
        temp.unlink(missing_ok=True)
        raise


def save_png(path: Path, image: Image.Image, metadata: dict[str, str]) -> None:
    """Write `image` as a PNG with each metadata item as a text chunk, atomically."""
    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value)  # falls back to an iTXt chunk for text that is not Latin-1
    _write_atomically(path, lambda temp: image.save(temp, format="PNG", pnginfo=info))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors (moved to the CPU) as a safetensors file with string metadata, atomically."""
    # Copies, because safetensors refuses tensors that share storage (e.g. rows of one batch).
    tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
    _write_atomically(path, lambda temp: save_file(tensors, temp, metadata=metadata))
