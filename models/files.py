"""A checkpoint's files: safetensors only (pickles are refused, never opened by torch), the
header alone (checked against its file) or every tensor cast as it is read, the weight and
config files of a folder's components, and the fingerprint that tells checkpoints apart
without reading them whole. Whatever is malformed is one InputError, never a traceback."""
import hashlib
import json
import math
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
# the dtypes p2p reads, as a header names them: floats for weights, integers for buffers it drops
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
          "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


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


def shown(value) -> str:
    """A header's value for a message: one line of ASCII, cut short."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def tensor_table(path: Path, header: bytes | None = None) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """{name: (dtype, shape)} of the tensors of a .safetensors file, from its header (`header`, if
    read already) checked as the safetensors library checks it before reading: every entry a dtype,
    a shape and data offsets that tile the file's data exactly. So a malformed header is one
    InputError before anything is allocated, on the meta device as on a real one. safe_open refuses
    the same headers, but opens the file first and mostly names neither the tensor nor the fault."""
    header = header or safetensors_header(path)
    bad = f"{path}: not a readable .safetensors file"
    try:
        table = json.loads(header[8:].decode("utf-8"))   # an object: the header starts with "{"
    except UnicodeDecodeError as e:
        at = 8 + e.start
        raise InputError(f"{bad} (its header is not UTF-8 text: byte {e.object[e.start]:#04x} at {at})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{bad} (its header is not JSON: {e})") from None
    metadata = table.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(f"{bad} (__metadata__ {shown(metadata)} is not a map of text to text)")
    size, out, spans = path.stat().st_size - len(header), {}, []   # size: the bytes of data after the header
    for name, entry in table.items():
        if not name.isprintable():   # a lone surrogate ("\ud800"), a newline: no parameter's name
            raise InputError(f"{bad} (a tensor name, {shown(name)}, is not printable text)")
        if not isinstance(entry, dict):
            raise InputError(f"{bad} (tensor {name} is {shown(entry)}, not an object with dtype, shape and "
                             "data_offsets)")
        if missing := [k for k in ("dtype", "shape", "data_offsets") if k not in entry]:
            raise InputError(f"{bad} (tensor {name} has no {missing[0]})")
        kind, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(kind, str) or kind not in DTYPES:
            raise InputError(f"{bad} (tensor {name} has dtype {shown(kind)}; p2p reads {', '.join(DTYPES)})")
        if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
            raise InputError(f"{bad} (tensor {name} has shape {shown(shape)}, not a list of sizes >= 0)")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise InputError(f"{bad} (tensor {name} has data_offsets {shown(offsets)}, not [start, end])")
        start, end = offsets
        if end > size:
            raise InputError(f"{bad} (tensor {name} ends at byte {end} of the data, but the file holds {size} bytes "
                             "of data; cut short?)")
        if (need := math.prod(shape) * DTYPES[kind].itemsize) != end - start:
            raise InputError(f"{bad} (tensor {name}: shape {shape} of {kind} is {need} bytes, its data_offsets "
                             f"span {end - start})")
        spans.append((start, end, name))
        out[name] = (DTYPES[kind], tuple(shape))
    at = 0
    for start, end, name in sorted(spans):   # the library reads only files whose tensors tile the data
        if start != at:
            raise InputError(f"{bad} (tensor {name} starts at byte {start} of the data, the one before it ends "
                             f"at {at})")
        at = end
    if at != size:
        raise InputError(f"{bad} (its tensors cover {at} of the {size} bytes of data)")
    return out


def read_safetensors(path: Path, device, dtype) -> dict[str, torch.Tensor]:
    """All tensors of a file, each cast as it is read so peak memory stays near the result; on the
    meta device the architecture alone, the shapes from the header (integers keep their dtype)."""
    table = tensor_table(path)
    if torch.device(device).type == "meta":
        return {k: torch.empty(shape, dtype=dtype if kind.is_floating_point else kind, device="meta")
                for k, (kind, shape) in table.items()}
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


def present(path: Path) -> bool:
    """Whether something is at `path` (a dangling link is nothing); InputError where that cannot be
    told, as for a symlink loop, which Path.exists() and is_file() take for nothing."""
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror})") from None
    return True


def config_bytes(file: Path) -> bytes | None:
    """A folder's config file, None where it has none."""
    if not present(file):
        return None
    try:
        return file.read_bytes()
    except OSError as e:   # a directory, no permission
        raise InputError(f"{file}: cannot read it ({e.strerror})") from None


def read_json(file: Path) -> dict:
    """A folder's JSON config, {} where it has none."""
    data = config_bytes(file)
    if data is None:
        return {}
    try:
        config = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise InputError(f"{file}: not a JSON object")
    return config


def component_file(folder: Path, stem: str) -> Path:
    """The safetensors weights of one component folder, full precision preferred."""
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
        if present(folder / name):
            return folder / name
    if any(folder.glob("*.bin")):
        raise InputError(PICKLE.format(path=next(folder.glob("*.bin"))))
    raise InputError(f"{folder}: no {stem}.safetensors")


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the single file, or a folder's unet, vae, text_encoder."""
    if not present(path):
        raise InputError(f"{path} does not exist (get weights with: p2p download)")
    if not path.is_dir():
        return [path]
    if missing := [f"{c}/" for c in FOLDER if not (present(path / c) and (path / c).is_dir())]:
        raise InputError(f"{path} is a directory but not a diffusers-layout checkpoint "
                         f"(it needs unet/, vae/ and text_encoder/; {', '.join(missing)} missing)")
    return [component_file(path / c, stem) for c, stem in FOLDER.items()]


def fingerprint(path) -> str:
    """16 hex digits that tell checkpoints apart, in milliseconds even for 4 GB: sha256 over each
    weight file's header and 16 evenly spaced 4 KiB samples of its data (and a folder's configs).
    It refuses what `load` refuses of the files: a malformed header, an unreadable config."""
    path, digest, block = Path(path), hashlib.sha256(), 4096
    for file in weight_files(path):
        header = safetensors_header(file)
        tensor_table(file, header)
        digest.update(header)
        start, end = len(header), file.stat().st_size
        with open(file, "rb") as f:
            for i in range(16):
                f.seek(start + max(0, end - start - block) * i // 15)
                digest.update(f.read(block))
    for config in [path / c / "config.json" for c in FOLDER] if path.is_dir() else []:
        digest.update(config_bytes(config) or b"")
    return digest.hexdigest()[:16]
