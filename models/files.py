"""A checkpoint's files: safetensors only (pickles are refused, never opened by torch), the
header alone or every tensor cast as it is read, the files of a folder's components, and the
fingerprint that tells checkpoints apart without reading them whole."""
import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import InputError

PICKLE = ("{path} is a pickle checkpoint: p2p never unpickles files (loading one can run "
          "arbitrary code). Use the .safetensors release of the model, or convert it once where "
          "you trust the file: safetensors.torch.save_file(torch.load(f, weights_only=True)"
          "['state_dict'], 'model.safetensors')")
PICKLE_SUFFIXES = {".ckpt", ".bin", ".pt", ".pth", ".pkl"}
# the diffusers layout's weight files: component folder -> file stem
FOLDER = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}


def cast(t: torch.Tensor, device, dtype) -> torch.Tensor:
    return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)


def check_device(device):
    """InputError unless this torch can put tensors on `device` ("cpu", "cuda", "cuda:1", "mps")."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise InputError(f"device {device}: not a torch device (use cpu, cuda or mps)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device}: no CUDA device is available to this torch")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device {device}: no MPS device is available to this torch")


def safetensors_header(path: Path) -> bytes:
    """The 8-byte length and JSON header of a .safetensors file (the data starts after them);
    InputError if the file is something else, pickles named as such."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise InputError(PICKLE.format(path=path))
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            # safetensors: a u64 little-endian header length, then that much JSON, starting "{"
            length = int.from_bytes(head[:8], "little")
            if len(head) == 9 and head[8:] == b"{" and length <= path.stat().st_size - 8:
                return head + f.read(length - 1)
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror})") from None
    # Magic numbers only once the file is not safetensors: its length's low byte may be 0x80.
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        raise InputError(PICKLE.format(path=path))   # a torch.save zip, or a bare pickle (protocol 2..5)
    raise InputError(f"{path}: not a readable .safetensors file (no safetensors header)")


def read_safetensors(path: Path, device, dtype) -> dict[str, torch.Tensor]:
    """All tensors of a file, each cast as it is read so peak memory stays near the result."""
    header = safetensors_header(path)
    if torch.device(device).type == "meta":   # the architecture alone: shapes from the header, no data read
        return {k: torch.empty(e["shape"], dtype=dtype if e["dtype"] in ("F64", "F32", "F16", "BF16") else torch.int64,
                               device="meta") for k, e in json.loads(header[8:]).items() if k != "__metadata__"}
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
        tensors = {}
        # Reopen every 64 tensors: closing unmaps the file pages read so far, so converting
        # (fp16 file -> fp32) peaks near the converted weights, not weights plus file.
        for start in range(0, len(keys), 64):
            with safe_open(str(path), framework="pt") as f:
                tensors.update({k: cast(f.get_tensor(k), device, dtype) for k in keys[start:start + 64]})
        return tensors
    except (SafetensorError, OSError) as e:   # truncated or corrupt; device errors are not the file's
        raise InputError(f"{path}: not a readable .safetensors file ({str(e).splitlines()[0]})") from None


def component_file(folder: Path, stem: str) -> Path:
    """The safetensors weights of one component folder, full precision preferred."""
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
        if (folder / name).is_file():
            return folder / name
    if any(folder.glob("*.bin")):
        raise InputError(PICKLE.format(path=next(folder.glob("*.bin"))))
    raise InputError(f"{folder}: no {stem}.safetensors")


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the single file, or a folder's unet, vae, text_encoder."""
    if not path.exists():
        raise InputError(f"{path} does not exist (get weights with: p2p download)")
    if not path.is_dir():
        return [path]
    if missing := [f"{c}/" for c in FOLDER if not (path / c).is_dir()]:
        raise InputError(f"{path} is a directory but not a diffusers-layout checkpoint "
                         f"(it needs unet/, vae/ and text_encoder/; {', '.join(missing)} missing)")
    return [component_file(path / c, stem) for c, stem in FOLDER.items()]


def fingerprint(path) -> str:
    """16 hex digits that tell checkpoints apart, in milliseconds even for 4 GB: sha256 over each
    weight file's header and 16 evenly spaced 4 KiB samples of its data (and a folder's configs)."""
    path, digest, block = Path(path), hashlib.sha256(), 4096
    for file in weight_files(path):
        header = safetensors_header(file)
        digest.update(header)
        start, end = len(header), file.stat().st_size
        with open(file, "rb") as f:
            for i in range(16):
                f.seek(start + max(0, end - start - block) * i // 15)
                digest.update(f.read(block))
    for config in [path / c / "config.json" for c in FOLDER] if path.is_dir() else []:
        digest.update(config.read_bytes() if config.is_file() else b"")
    return digest.hexdigest()[:16]
