"""Writing results: image and safetensors files with their metadata, and the checks on output paths.

Every file is written beside its final name and renamed into place, so a failure leaves no half
file, and through a plain open(), so it gets the permissions the umask gives any new file.
"""

import contextlib
import errno
import hashlib
import json
import os
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from models import InputError
from models.files import present


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
TENSORS_SUFFIX = ".safetensors"
JPEG_QUALITY = 95
JPEG_COMMENT_MAX = 65533  # a COM segment's 16-bit length also counts its own 2 bytes
WEBP_MAX_SIDE = 16383  # libwebp's limit, in pixels
EXIF_IMAGE_DESCRIPTION = 0x010E  # the EXIF tag a WebP file carries the metadata JSON in


# ---- files ------------------------------------------------------------------------------

def _temp(path: Path) -> Path:
    # A plain name rather than mkstemp, so the result gets the usual umask permissions, not 0600.
    # A name near the file system's limit has no room for the temp's additions: then a short one.
    name = f".{path.name}.{os.getpid()}.tmp"
    if len(os.fsencode(name)) > _name_max(path.parent):
        name = f".p2p-{hashlib.sha256(path.name.encode()).hexdigest()[:16]}.{os.getpid()}.tmp"
    return path.with_name(name)


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):   # no such folder (refused later), no pathconf (Windows)
        return 255


def _check_suffix(path: Path, kind: str) -> None:
    suffix = path.suffix.lower()
    if kind == "image" and suffix not in IMAGE_SUFFIXES:
        raise InputError(f"{path}: image outputs are {', '.join(IMAGE_SUFFIXES[:-1])} or {IMAGE_SUFFIXES[-1]}")
    if kind == "tensors" and suffix != TENSORS_SUFFIX:
        raise InputError(f"{path}: this output is a safetensors file: name it {TENSORS_SUFFIX}")
    if kind not in ("image", "tensors"):
        raise ValueError(f"unknown output kind {kind!r}")


def check_output(path: Path, kind: str) -> None:
    """Refuse, before any work is done, an output that could not be written: a suffix that is not
    one of `kind`'s ("image" or "tensors"), a missing directory, a directory, no write access."""
    path = Path(path)
    _check_suffix(path, kind)
    if not path.parent.is_dir():
        raise InputError(f"output directory does not exist: {path.parent}")
    if os.path.isdir(path):  # False, not an error, for a name too long to exist
        raise InputError(f"cannot write {path}: it is a directory")
    if len(os.fsencode(path.name)) > _name_max(path.parent):   # (the temp file, below, may have a shorter name)
        raise InputError(f"cannot write {path}: {os.strerror(errno.ENAMETOOLONG)}")
    # Create and delete the writer's own temp file: root passes os.access even where writes fail.
    temp = _temp(path)
    try:
        temp.open("wb").close()
        temp.unlink()
    except OSError as error:
        raise InputError(f"cannot write {path}: {error.strerror or error}") from error


def _discard(temp: Path) -> None:
    with contextlib.suppress(OSError):  # never created (too long a name, no access): nothing to remove
        temp.unlink()


def _write_atomically(path: Path, write) -> None:
    """Call write(temp) on a file beside `path`, then rename it into place; on failure leave no file."""
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"output directory does not exist: {path.parent}")
    temp = _temp(path)
    try:
        write(temp)
        os.replace(temp, path)
    except OSError as error:  # unwritable directory, disk full, path is a directory, name too long, ...
        _discard(temp)
        raise InputError(f"cannot write {path}: {error.strerror or error}") from error
    except BaseException:  # any other failure, Ctrl-C included
        _discard(temp)
        raise


def save_png(path: Path, image: Image.Image, metadata: dict[str, str]) -> None:
    """Write `image` as a PNG with each metadata item as a text chunk, atomically."""
    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value)  # falls back to an iTXt chunk for text that is not Latin-1
    _write_atomically(path, lambda temp: image.save(temp, format="PNG", pnginfo=info))


def check_image(path: Path, size: tuple[int, int] | None, metadata: dict[str, str]) -> None:
    """What save_image would refuse in an image of `size` (width, height; None: not known yet) with
    this metadata: a WebP past libwebp's side, a JPEG whose metadata overflows its comment. The
    commands call it before sampling, so that no work is lost to it."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".webp" and size is not None and max(size) > WEBP_MAX_SIDE:
        raise InputError(f"cannot write {path}: {size[0]}x{size[1]} pixels is past WebP's limit of {WEBP_MAX_SIDE} "
                         "a side; name it .png")
    if suffix in (".jpg", ".jpeg"):
        comment = len(json.dumps(metadata, ensure_ascii=False).encode())
        if comment > JPEG_COMMENT_MAX:
            raise InputError(f"cannot write {path}: {comment} bytes of metadata do not fit a JPEG comment "
                             f"({JPEG_COMMENT_MAX} at most); name it .png")


def save_image(path: Path, image: Image.Image, metadata: dict[str, str]) -> None:
    """Write `image` in the format its suffix names, with the metadata, atomically.

    .png   one text chunk per item (save_png)
    .jpg   quality 95; the items as one JSON object, UTF-8, in the comment (Pillow: info["comment"])
    .webp  lossless; the JSON in EXIF ImageDescription, an ASCII field, so non-ASCII is \\u-escaped
    """
    path = Path(path)
    _check_suffix(path, "image")
    check_image(path, image.size, metadata)
    suffix = path.suffix.lower()
    if suffix == ".png":
        save_png(path, image, metadata)
    elif suffix == ".webp":
        exif = Image.Exif()
        exif[EXIF_IMAGE_DESCRIPTION] = json.dumps(metadata)
        _write_atomically(path, lambda temp: image.save(temp, format="WEBP", lossless=True, exif=exif))
    else:
        comment = json.dumps(metadata, ensure_ascii=False).encode()
        _write_atomically(path, lambda temp: image.convert("RGB").save(
            temp, format="JPEG", quality=JPEG_QUALITY, comment=comment))


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata save_image or save_tensors wrote into a file (by its suffix); OSError or
    ValueError for a file that is not one."""
    path = Path(path)
    if path.suffix.lower() == TENSORS_SUFFIX:
        with safetensors.safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    with Image.open(path) as image:
        if image.format == "PNG":
            return dict(image.text)
        if image.format == "WEBP":
            return json.loads(image.getexif().get(EXIF_IMAGE_DESCRIPTION, "{}"))
        return json.loads(image.info.get("comment", b"{}"))


def _canonical(data: bytes) -> bytes:
    """A safetensors file with its JSON header rewritten the same way every time. safetensors writes
    the metadata from a hash map, so identical runs could differ; this sorts the keys, writes compact
    UTF-8 and pads with spaces to 8 bytes, as the format asks. Data offsets count from the header's
    end, so they stay as they are."""
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data[8 + n:]


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors (moved to the CPU) as a safetensors file with string metadata, atomically;
    the same tensors and metadata always give the same bytes."""
    # Copies, because safetensors refuses tensors that share storage (e.g. rows of one batch).
    tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
    # Serialised here and written by us, so a failed write is an OSError like any other file's.
    data = _canonical(safetensors.torch.save(tensors, metadata=metadata))
    _write_atomically(path, lambda temp: temp.write_bytes(data))


def check_outputs(outputs: dict[str, tuple[Path | None, str]], inputs: dict[str, Path | None]):
    """Each output ({flag: (path, "image" | "tensors")}) writable under a known suffix, no two of
    them the same file and none of them an input ({flag: path}) or inside an input folder (a
    diffusers checkpoint, whose every file is read): p2p never overwrites those. Paths compare
    resolved, so symbolic and hard links to an input count as the input."""
    seen = {}
    for flag, (path, kind) in outputs.items():
        if path is None:
            continue
        try:
            real = path.resolve()
        except (OSError, RuntimeError):   # RuntimeError: Python < 3.13 on a symbolic link loop
            raise InputError(f"cannot write {flag} {path}: a loop of symbolic links") from None
        for name, source in inputs.items():
            if source is None or not present(source):   # present: a symlink loop is one line
                continue
            if source.is_dir() and (real == source.resolve() or source.resolve() in real.parents or path.exists()
                                    and any(same_file(path, f) for f in source.rglob("*") if f.is_file())):
                raise InputError(f"{flag} {path} is inside the {name} folder {source}: p2p never writes into "
                                 "its inputs")
            if same_file(path, source):
                raise InputError(f"{flag} {path} is the {name} input: p2p never overwrites its inputs")
        if real in seen:
            raise InputError(f"{seen[real]} and {flag} are the same file ({path}): each output needs its own")
        check_output(path, kind)
        seen[real] = flag


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same resolved path, or (both there) the same inode."""
    try:
        return a.resolve() == b.resolve() or os.path.samefile(a, b)
    except (OSError, RuntimeError):   # one of them is not there (yet), or a link loop (refused when read)
        return False
