"""Load SD v1 weights from a single LDM-layout .safetensors file or a diffusers-layout folder.

Our module tree carries the diffusers names, so a folder loads as a plain state dict (plus
the old VAE attention names); the single file goes through `ldm_to_diffusers`. The
architecture is read off the tensors (and config.json where a folder has one); loading is
strict, and parameters are built on the meta device so nothing is initialised twice.
"""
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import CLIPTextConfig, CLIPTextModel

from . import InputError
from .text import TOKENIZER_DIR, TextEncoder, embeddings, load_tokenizer, module_names, text_config
from .unet import UNet, UNetConfig
from .vae import VAE, VAEConfig

PICKLE = ("{path} is a pickle checkpoint: p2p never unpickles files (loading one can run "
          "arbitrary code). Use the .safetensors release of the model, or convert it once where "
          "you trust the file: safetensors.torch.save_file(torch.load(f, weights_only=True)"
          "['state_dict'], 'model.safetensors')")
PICKLE_SUFFIXES = {".ckpt", ".bin", ".pt", ".pth", ".pkl"}
FOLDER = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
LDM_PREFIXES = {"model.diffusion_model.": "unet", "first_stage_model.": "vae",
                "cond_stage_model.transformer.": "text"}
OTHER_MODELS = {"conditioner.embedders.": "an SDXL checkpoint",
                "cond_stage_model.model.": "an SD 2.x checkpoint (OpenCLIP text encoder)",
                "model.diffusion_model.label_emb.": "an SDXL or unCLIP checkpoint"}


@dataclass
class StableDiffusion:
    """The three networks of SD v1, the checkpoint's name and the `fingerprint` of its files."""
    unet: UNet
    vae: VAE
    text: TextEncoder
    name: str
    fingerprint: str

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype


# ---- reading tensors -------------------------------------------------------------------

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


# ---- the single-file LDM layout -------------------------------------------------------

def split_ldm(sd: dict) -> dict[str, dict]:
    """Single-file state dict -> {"unet": .., "vae": .., "text": ..} with LDM names inside."""
    for marker, what in OTHER_MODELS.items():
        found = next((k for k in sd if k.startswith(marker)), None)
        if found is not None:
            raise InputError(f"found {what} (key {found}); p2p supports Stable Diffusion v1 only")
    parts = {part: {} for part in LDM_PREFIXES.values()}
    for key, value in sd.items():
        # dropped: EMA copies, LatentDiffusion's top-level schedule buffers, CLIP's position_ids
        if key.startswith("model_ema.") or "." not in key or key.endswith("position_ids"):
            continue
        prefix = next((p for p in LDM_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise InputError(f"unexpected tensor {key} for a Stable Diffusion v1 checkpoint")
        parts[LDM_PREFIXES[prefix]][key[len(prefix):]] = value
    if not parts["unet"]:
        raise InputError(f"not a Stable Diffusion v1 checkpoint: no model.diffusion_model.* tensors "
                         f"(found e.g. {', '.join(list(sd)[:3])})")
    return parts


RESBLOCK = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
            ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut")]
VAE_NAMES = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"),
             ("mid.block_1", "mid_block.resnets.0"), ("mid.block_2", "mid_block.resnets.1"),
             ("mid.attn_1.norm", "mid_block.attentions.0.group_norm"),
             ("mid.attn_1.q", "mid_block.attentions.0.to_q"), ("mid.attn_1.k", "mid_block.attentions.0.to_k"),
             ("mid.attn_1.v", "mid_block.attentions.0.to_v"),
             ("mid.attn_1.proj_out", "mid_block.attentions.0.to_out.0")]
VAE_LEGACY_ATTENTION = [("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0")]


def indices(sd: dict, pattern: str) -> list[int]:
    return sorted({int(m[1]) for k in sd if (m := re.match(pattern, k))})


def sub(key: str, old: str, new: str) -> str:
    """Replace the dotted component path `old` in `key` (whole components only)."""
    return re.sub(rf"(^|\.){re.escape(old)}(\.|$)", rf"\g<1>{new}\g<2>", key)


def ldm_unet_key(key: str, layers: int) -> str:
    """One LDM UNet name -> diffusers name; `layers` is res blocks per level."""
    for old, new in [("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
                     ("input_blocks.0.0", "conv_in"), ("out.0", "conv_norm_out"), ("out.2", "conv_out"),
                     ("middle_block.0", "mid_block.resnets.0"), ("middle_block.1", "mid_block.attentions.0"),
                     ("middle_block.2", "mid_block.resnets.1")]:
        if key.startswith(old + "."):
            key = new + key[len(old):]
    if m := re.match(r"input_blocks\.(\d+)\.(\d+)\.(.*)", key):
        k, part, rest = int(m[1]), int(m[2]), m[3]
        level, j = divmod(k - 1, layers + 1)
        if rest.startswith("op."):       # the stride-2 conv closing a level
            key = f"down_blocks.{level}.downsamplers.0.conv.{rest[3:]}"
        else:
            key = f"down_blocks.{level}.{'resnets' if part == 0 else 'attentions'}.{j}.{rest}"
    elif m := re.match(r"output_blocks\.(\d+)\.(\d+)\.(.*)", key):
        k, part, rest = int(m[1]), int(m[2]), m[3]
        index, j = divmod(k, layers + 1)
        if part > 0 and rest.startswith("conv."):   # the upsampler sits after the (optional) attention
            key = f"up_blocks.{index}.upsamplers.0.{rest}"
        else:
            key = f"up_blocks.{index}.{'resnets' if part == 0 else 'attentions'}.{j}.{rest}"
    for old, new in RESBLOCK:
        key = sub(key, old, new)
    return key


def ldm_vae_key(key: str, levels: int) -> str:
    """One LDM autoencoder name -> diffusers name. LDM numbers decoder levels from the bottom."""
    key = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", key)
    if m := re.match(r"decoder\.up\.(\d+)\.(block|upsample)\.(.*)", key):
        part = "resnets." if m[2] == "block" else "upsamplers.0."
        key = f"decoder.up_blocks.{levels - 1 - int(m[1])}.{part}{m[3]}"
    for old, new in VAE_NAMES:
        key = sub(key, old, new)
    return key


def ldm_to_diffusers(parts: dict[str, dict]) -> dict[str, dict]:
    """The explicit rename of the single-file layout into our (diffusers) module names."""
    unet = parts["unet"]
    down, blocks = indices(unet, r"input_blocks\.(\d+)\.0\.op\."), indices(unet, r"input_blocks\.(\d+)\.")
    if not blocks:
        raise InputError("UNet: checkpoint lacks input_blocks.* (model.diffusion_model.input_blocks.*)")
    layers = down[0] - 1 if down else blocks[-1]
    levels = 1 + max((int(k.split(".")[2]) for k in parts["vae"] if k.startswith("decoder.up.")), default=0)
    vae = {}
    for k, v in parts["vae"].items():
        new = ldm_vae_key(k, levels)
        vae[new] = v.flatten(1) if ".attentions." in new and v.ndim == 4 else v   # 1x1 convs -> linear
    text = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in parts["text"].items()}
    return {"unet": {ldm_unet_key(k, layers): v for k, v in unet.items()}, "vae": vae, "text": text}


# ---- the architecture, read off the tensors --------------------------------------------

def need(sd: dict, key: str, what: str, dims: int) -> torch.Tensor:
    """A tensor the architecture is read from, or an InputError naming what is wrong with it."""
    if key not in sd:
        raise InputError(f"{what}: checkpoint lacks {key}")
    if sd[key].ndim != dims:
        raise InputError(f"{what}: {key} has shape {tuple(sd[key].shape)}, expected {dims} dimensions")
    return sd[key]


def check_split(what: str, channels: tuple[int, ...], n: int, into: str):
    """GroupNorm and attention need every width to split evenly; say so before torch does."""
    if bad := [c for c in channels if c % n]:
        raise InputError(f"{what}: width {bad[0]} does not split into {n} {into}")


def infer_unet(sd: dict, heads: int = 8, groups: int = 32) -> UNetConfig:
    """Shapes give levels, widths, attention levels, depth; heads and groups are SD v1 constants."""
    levels = indices(sd, r"down_blocks\.(\d+)\.")
    if not levels:
        raise InputError("UNet weights not found (no down_blocks.*)")
    channels = tuple(need(sd, f"down_blocks.{i}.resnets.0.conv1.weight", "UNet", 4).shape[0] for i in levels)
    check_split("UNet", channels, groups, "GroupNorm groups")
    check_split("UNet", channels, heads, "attention heads")
    cross = next((v for k, v in sd.items() if k.endswith("attn2.to_k.weight")), None)
    return UNetConfig(
        in_channels=need(sd, "conv_in.weight", "UNet", 4).shape[1],
        out_channels=need(sd, "conv_out.weight", "UNet", 4).shape[0], channels=channels,
        attention=tuple(any(k.startswith(f"down_blocks.{i}.attentions.") for k in sd) for i in levels),
        layers_per_block=len(indices(sd, r"down_blocks\.0\.resnets\.(\d+)\.")),
        context_dim=cross.shape[-1] if cross is not None else 768,
        transformer_depth=max(1, len(indices(sd, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\."))),
        heads=heads, groups=groups)


def infer_vae(sd: dict, groups: int = 32, scale: float = 0.18215) -> VAEConfig:
    levels = indices(sd, r"encoder\.down_blocks\.(\d+)\.")
    if not levels:
        raise InputError("VAE weights not found (no encoder.down_blocks.*)")
    channels = tuple(need(sd, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", "VAE", 4).shape[0] for i in levels)
    check_split("VAE", channels, groups, "GroupNorm groups")
    return VAEConfig(
        image_channels=need(sd, "encoder.conv_in.weight", "VAE", 4).shape[1],
        latent_channels=need(sd, "post_quant_conv.weight", "VAE", 4).shape[0], channels=channels,
        layers_per_block=len(indices(sd, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")), groups=groups, scale=scale)


def infer_text(sd: dict) -> CLIPTextConfig:
    emb = need(sd, "text_model.embeddings.token_embedding.weight", "text encoder", 2)
    if emb.shape[1] % 64:
        raise InputError(f"text encoder: width {emb.shape[1]} is not a whole number of 64-wide heads")
    return text_config(vocab=emb.shape[0], width=emb.shape[1],
                       layers=len(indices(sd, r"text_model\.encoder\.layers\.(\d+)\.")),
                       mlp=need(sd, "text_model.encoder.layers.0.mlp.fc1.weight", "text encoder", 2).shape[0])


# ---- building the modules --------------------------------------------------------------

def fill(model: torch.nn.Module, sd: dict, what: str) -> torch.nn.Module:
    """Strict load into a meta-device model: every tensor used, every parameter filled, shapes equal."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unused = [k for k in sd if k not in expected]
    if missing:
        raise InputError(f"{what}: checkpoint lacks {missing[0]} ({len(missing)} tensors missing)")
    if unused:
        raise InputError(f"{what}: checkpoint has unexpected {unused[0]} ({len(unused)} tensors unused)")
    for k, v in expected.items():
        if v.shape != sd[k].shape:
            raise InputError(f"{what}: {k} has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}")
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def build(sd: dict[str, dict], path: Path, tokenizer_dir: Path, unet_cfg: UNetConfig,
          vae_cfg: VAEConfig, text_cfg: CLIPTextConfig) -> StableDiffusion:
    tokenizer = load_tokenizer(tokenizer_dir)
    # the three must fit together: latents pass UNet <-> VAE, text widths and token ids pass CLIP -> UNet
    if not unet_cfg.in_channels == unet_cfg.out_channels == vae_cfg.latent_channels:
        raise InputError(f"the UNet takes {unet_cfg.in_channels} and gives {unet_cfg.out_channels} latent channels, "
                         f"the VAE's latents have {vae_cfg.latent_channels} (inpainting UNets are not supported)")
    if text_cfg.hidden_size != unet_cfg.context_dim:
        raise InputError(f"text encoder width {text_cfg.hidden_size} does not match the UNet's "
                         f"context width {unet_cfg.context_dim}")
    if text_cfg.vocab_size != len(tokenizer):
        raise InputError(f"text encoder: {text_cfg.vocab_size} token embeddings, the tokenizer has {len(tokenizer)}")
    with torch.device("meta"):
        unet, vae, clip = UNet(unet_cfg), VAE(vae_cfg), CLIPTextModel(text_cfg)
    unet, vae, clip = fill(unet, sd["unet"], "UNet"), fill(vae, sd["vae"], "VAE"), fill(clip, module_names(sd["text"], clip), "text encoder")
    # position_ids is a non-persistent buffer: not in checkpoints, so remake it off the meta device
    emb = embeddings(clip)
    emb.position_ids = torch.arange(emb.position_embedding.num_embeddings, device=emb.position_embedding.weight.device)[None]
    return StableDiffusion(unet, vae, TextEncoder(clip, tokenizer), path.name, fingerprint(path))


def load_single_file(path: Path, device, dtype) -> StableDiffusion:
    sd = ldm_to_diffusers(split_ldm(read_safetensors(path, device, dtype)))
    return build(sd, path, TOKENIZER_DIR, infer_unet(sd["unet"]), infer_vae(sd["vae"]), infer_text(sd["text"]))


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


def read_config(folder: Path) -> dict:
    file = folder / "config.json"
    if not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise InputError(f"{file}: not a JSON object")
    return config


def load_folder(path: Path, device, dtype) -> StableDiffusion:
    unet_file, vae_file, text_file = weight_files(path)
    sd = {"unet": read_safetensors(unet_file, device, dtype), "vae": read_safetensors(vae_file, device, dtype),
          "text": read_safetensors(text_file, device, dtype)}
    # older diffusers files (the v1.4 / v1.5 repositories among them) use other VAE attention names
    for old, new in VAE_LEGACY_ATTENTION:
        sd["vae"] = {sub(k, old, new): v for k, v in sd["vae"].items()}
    sd["text"] = {k: v for k, v in sd["text"].items() if not k.endswith("position_ids")}
    unet_json, vae_json, text_json = (read_config(path / c) for c in FOLDER)
    if unet_json.get("use_linear_projection") or unet_json.get("addition_embed_type"):
        raise InputError(f"{path}: this UNet is not Stable Diffusion v1 (an SD 2.x or SDXL config)")
    heads = unet_json.get("attention_head_dim", 8)   # diffusers' name for SD v1's head count
    if isinstance(heads, list):
        if len(set(heads)) != 1:
            raise InputError(f"{path}: per-level head counts {heads} are not Stable Diffusion v1")
        heads = heads[0]
    text_cfg = CLIPTextConfig.from_dict(text_json) if text_json else infer_text(sd["text"])
    tokenizer = path / "tokenizer" if (path / "tokenizer" / "vocab.json").is_file() else TOKENIZER_DIR
    return build(sd, path, tokenizer,
                 infer_unet(sd["unet"], heads=heads, groups=unet_json.get("norm_num_groups", 32)),
                 infer_vae(sd["vae"], groups=vae_json.get("norm_num_groups", 32),
                           scale=vae_json.get("scaling_factor", 0.18215)),
                 text_cfg)


def load(path, device="cpu", dtype=torch.float32) -> StableDiffusion:
    """Load SD v1 from a single .safetensors file (LDM layout) or a diffusers-layout folder.

    | path   | a `.safetensors` file or a folder with unet/, vae/, text_encoder/ |
    | device | "cpu", "cuda", "mps"; "meta": the architecture alone, from the headers |
    | dtype  | torch.float32, torch.float16 or torch.bfloat16                      |
    """
    check_device(device)
    path = Path(path)
    weight_files(path)   # a missing path or folder part is named before anything is read
    return load_folder(path, device, dtype) if path.is_dir() else load_single_file(path, device, dtype)


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
