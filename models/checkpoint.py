"""Load SD v1 or 2.x weights from a single LDM-layout .safetensors file or a diffusers-layout folder.

Our module tree carries the diffusers names, so a folder loads as a plain state dict (plus
the old VAE attention names); the single file goes through `ldm.ldm_to_diffusers`. The
architecture is read off the tensors (and config.json where a folder has one); loading is
strict, and parameters are built on the meta device so nothing is initialised twice.

SD v1 and SD 2 differ in the text encoder (OpenAI CLIP ViT-L/14, 768 wide; OpenCLIP ViT-H/14,
1024 wide, exact GELU, padded with "!"), the heads (8 per level; 64 wide, so channels / 64), the
transformers' projections (1x1 convs; Linear) and, for SD 2 at 768 px, the prediction (v).
"""
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel
from transformers.activations import ACT2FN

from . import PREDICTIONS, InputError
from .files import FOLDER, check_device, fingerprint, present, read_json, read_safetensors, shown, weight_files
from .ldm import indices, ldm_to_diffusers, split_ldm, sub
from .text import TOKENIZER_DIR, TextEncoder, embeddings, load_tokenizer, module_names, text_config
from .unet import UNet, UNetConfig
from .vae import VAE, VAEConfig

VAE_LEGACY_ATTENTION = [("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0")]
PAD = {False: "<|endoftext|>", True: "!"}   # SD v1 pads with the end token; SD 2 with "!" (id 0), as OpenCLIP
# the text encoder's sizes text_encoder/config.json gives (the rest, dropout and the like, SD does not use)
TEXT_COUNTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "max_position_embeddings")
SD2_PREDICTION = ("{path} is a Stable Diffusion 2.x file, which does not say what its UNet predicts: pass "
                  "--prediction v_prediction (SD 2.0 / 2.1 at 768 px) or --prediction epsilon (the -base models "
                  "at 512 px)")


@dataclass
class StableDiffusion:
    """The three networks, the checkpoint's name, the `fingerprint` of its files, what the UNet
    predicts ("epsilon", or "v_prediction": v = sqrt(alpha_t) eps - sqrt(1 - alpha_t) x_0) and
    the image side it was trained at (`native_size`, pixels: 512, or 768 for SD 2 at 768)."""
    unet: UNet
    vae: VAE
    text: TextEncoder
    name: str
    fingerprint: str
    prediction: str
    native_size: int

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype


# ---- the architecture, read off the tensors --------------------------------------------

def need(state: dict, key: str, what: str, dims: int) -> torch.Tensor:
    """A tensor the architecture is read from, or an InputError naming what is wrong with it."""
    if key not in state:
        raise InputError(f"{what}: checkpoint lacks {key}")
    if state[key].ndim != dims:
        raise InputError(f"{what}: {key} has shape {tuple(state[key].shape)}, expected {dims} dimensions")
    return state[key]


def check_split(what: str, channels: tuple[int, ...], n: int, into: str):
    """GroupNorm and attention need every width to split evenly; say so before torch does."""
    if bad := [c for c in channels if c % n]:
        raise InputError(f"{what}: width {bad[0]} does not split into {into}")


def linear_projections(state: dict) -> bool:
    """SD 2's transformers project in and out with Linear layers (2-D weights), SD v1's with 1x1 convs."""
    proj = next((v for k, v in state.items() if k.endswith(".proj_in.weight")), None)
    return proj is not None and proj.ndim == 2


def head_counts(counts: list, channels: tuple[int, ...]) -> tuple[int, int | None]:
    """A config's head count per level -> (heads, head_dim): one count for all (SD v1), or one
    head width (SD 2: [5, 10, 20, 20] heads for 320, 640, 1280, 1280 channels are 64 wide)."""
    if len(counts) != len(channels) or not all(type(n) is int and n > 0 for n in counts):
        raise InputError(f"UNet: {len(channels)} levels, but the config gives the head counts {counts}")
    if len(set(counts)) == 1:
        return counts[0], None
    if any(c % n for c, n in zip(channels, counts)) or len({c // n for c, n in zip(channels, counts)}) > 1:
        raise InputError(f"UNet: head counts {counts} for widths {list(channels)} do not share one head width")
    return UNetConfig.heads, channels[0] // counts[0]


def infer_unet(state: dict, heads: int | list = 8, head_dim: int | None = None, groups: int = 32) -> UNetConfig:
    """Shapes give levels, widths, attention levels, depth and the projections; the heads are `heads`
    per level (SD v1: 8), or `head_dim` wide (SD 2: 64), or a config's list of counts per level."""
    levels = indices(state, r"down_blocks\.(\d+)\.")
    if not levels:
        raise InputError("UNet weights not found (no down_blocks.*)")
    channels = tuple(need(state, f"down_blocks.{i}.resnets.0.conv1.weight", "UNet", 4).shape[0] for i in levels)
    check_split("UNet", channels, groups, f"{groups} GroupNorm groups")
    if isinstance(heads, list):
        heads, head_dim = head_counts(heads, channels)
    if type(heads) is not int or heads < 1:   # not True, not 8.0
        raise InputError(f"UNet: {heads!r} is not a number of attention heads")
    if head_dim:
        check_split("UNet", channels, head_dim, f"{head_dim}-wide attention heads")
    else:
        check_split("UNet", channels, heads, f"{heads} attention heads")
    cross = next((v for k, v in state.items() if k.endswith("attn2.to_k.weight")), None)
    return UNetConfig(
        in_channels=need(state, "conv_in.weight", "UNet", 4).shape[1],
        out_channels=need(state, "conv_out.weight", "UNet", 4).shape[0], channels=channels,
        attention=tuple(any(k.startswith(f"down_blocks.{i}.attentions.") for k in state) for i in levels),
        layers_per_block=len(indices(state, r"down_blocks\.0\.resnets\.(\d+)\.")),
        context_dim=cross.shape[-1] if cross is not None else 768,
        transformer_depth=max(1, len(indices(state, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\."))),
        heads=heads, head_dim=head_dim, linear_projection=linear_projections(state), groups=groups)


def infer_vae(state: dict, groups: int = 32, scale: float = 0.18215) -> VAEConfig:
    levels = indices(state, r"encoder\.down_blocks\.(\d+)\.")
    if not levels:
        raise InputError("VAE weights not found (no encoder.down_blocks.*)")
    channels = tuple(need(state, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", "VAE", 4).shape[0] for i in levels)
    check_split("VAE", channels, groups, f"{groups} GroupNorm groups")
    return VAEConfig(
        image_channels=need(state, "encoder.conv_in.weight", "VAE", 4).shape[1],
        latent_channels=need(state, "post_quant_conv.weight", "VAE", 4).shape[0], channels=channels,
        layers_per_block=len(indices(state, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")), groups=groups, scale=scale)


def infer_text(state: dict, act: str = "quick_gelu") -> CLIPTextConfig:
    """Shapes give vocabulary, width, layers, MLP width; the activation is SD v1's quick_gelu, SD 2's gelu."""
    emb = need(state, "text_model.embeddings.token_embedding.weight", "text encoder", 2)
    if emb.shape[1] % 64:
        raise InputError(f"text encoder: width {emb.shape[1]} is not a whole number of 64-wide heads")
    return text_config(vocab=emb.shape[0], width=emb.shape[1],
                       layers=len(indices(state, r"text_model\.encoder\.layers\.(\d+)\.")),
                       mlp=need(state, "text_model.encoder.layers.0.mlp.fc1.weight", "text encoder", 2).shape[0], act=act)


# ---- building the modules --------------------------------------------------------------

def fill(model: torch.nn.Module, state: dict, what: str) -> torch.nn.Module:
    """Strict load into a meta-device model: every tensor used, every parameter filled, shapes equal,
    floating-point weights where the model has them."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unused = [k for k in state if k not in expected]
    if missing:
        raise InputError(f"{what}: checkpoint lacks {missing[0]} ({len(missing)} tensors missing)")
    if unused:
        raise InputError(f"{what}: checkpoint has unexpected {unused[0]} ({len(unused)} tensors unused)")
    for k, v in expected.items():
        if v.shape != state[k].shape:
            raise InputError(f"{what}: {k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}")
        if v.is_floating_point() and not state[k].is_floating_point():   # torch would refuse it mid-load
            raise InputError(f"{what}: {k} holds {str(state[k].dtype).removeprefix('torch.')} values, "
                             "expected floating-point weights")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def build(state: dict[str, dict], path: Path, unet_cfg: UNetConfig, vae_cfg: VAEConfig, text_cfg: CLIPTextConfig,
          tokenizer_dir: Path, pad: str, prediction: str, native_size: int) -> StableDiffusion:
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
    if pad not in tokenizer.get_vocab():
        raise InputError(f"the pad token {pad!r} is not in the tokenizer's vocabulary")
    with torch.device("meta"):
        unet, vae, clip = UNet(unet_cfg), VAE(vae_cfg), CLIPTextModel(text_cfg)
    unet, vae = fill(unet, state["unet"], "UNet"), fill(vae, state["vae"], "VAE")
    clip = fill(clip, module_names(state["text"], clip), "text encoder")
    # position_ids is a non-persistent buffer: not in checkpoints, so remake it off the meta device
    emb = embeddings(clip)
    emb.position_ids = torch.arange(emb.position_embedding.num_embeddings, device=emb.position_embedding.weight.device)[None]
    return StableDiffusion(unet, vae, TextEncoder(clip, tokenizer, pad), path.name, fingerprint(path), prediction,
                           native_size)


def check_prediction(prediction, where: str) -> str:
    if prediction not in PREDICTIONS:
        raise InputError(f"{where}: {prediction!r} is not a prediction type p2p samples (epsilon or v_prediction)")
    return prediction


def prediction_of(path, prediction: str | None = None) -> str:
    """What the UNet at `path` predicts, as `load` decides it, from the headers and the scheduler
    config alone (milliseconds): what an inversion records before the model loads."""
    path = Path(path)
    if prediction is not None:
        return check_prediction(prediction, "prediction")
    if path.is_dir():
        scheduler = path / "scheduler" / "scheduler_config.json"
        return check_prediction(read_json(scheduler).get("prediction_type", "epsilon"), str(scheduler))
    weight_files(path)
    if split_ldm(read_safetensors(path, "meta", torch.float32))["openclip"]:
        raise InputError(SD2_PREDICTION.format(path=path))
    return "epsilon"


def load_single_file(path: Path, device, dtype, prediction: str | None) -> StableDiffusion:
    """The text encoder tells SD 2 (OpenCLIP, cond_stage_model.model.*) from SD v1 (OpenAI CLIP); the
    file cannot tell what SD 2's UNet predicts, so the caller must."""
    sd2 = bool(split_ldm(read_safetensors(path, "meta", dtype))["openclip"])   # the header alone, before the data
    if sd2 and prediction is None:
        raise InputError(SD2_PREDICTION.format(path=path))
    state = ldm_to_diffusers(split_ldm(read_safetensors(path, device, dtype)))
    prediction = prediction or "epsilon"
    return build(state, path, infer_unet(state["unet"], head_dim=64 if sd2 else None), infer_vae(state["vae"]),
                 infer_text(state["text"], "gelu" if sd2 else "quick_gelu"), TOKENIZER_DIR, PAD[sd2], prediction,
                 768 if prediction == "v_prediction" else 512)


def pad_token(tokenizer: Path, sd2: bool) -> str:
    """The pad token tokenizer/special_tokens_map.json (or else tokenizer_config.json) names, else
    the model's own: "!" for SD 2, <|endoftext|> for SD v1."""
    for file in (tokenizer / "special_tokens_map.json", tokenizer / "tokenizer_config.json"):
        pad = read_json(file).get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        if pad is not None:
            if not isinstance(pad, str):
                raise InputError(f"{file}: pad_token {pad!r} is not a token")
            return pad
    return PAD[sd2]


# ---- a folder's configs ---------------------------------------------------------------------

def count(config: dict, key: str, default: int, file: Path) -> int:
    """A config's size or count (norm_num_groups, hidden_size, ...): a whole number >= 1."""
    value = config.get(key, default)
    if type(value) is not int or value < 1:
        raise InputError(f"{file}: {key} {shown(value)} is not a whole number >= 1")
    return value


def scale(config: dict, key: str, default: float, file: Path) -> float:
    """A config's factor or epsilon (scaling_factor, layer_norm_eps): a finite number > 0."""
    value = config.get(key, default)
    if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
        raise InputError(f"{file}: {key} {shown(value)} is not a number > 0")
    return value


def folder_text_config(config: dict, file: Path) -> CLIPTextConfig:
    """text_encoder/config.json's text encoder, each value checked first (transformers' own checks,
    where it has them, end in tracebacks). Absent values, and what SD does not read (dropout, the
    pooled output's token ids), are transformers' defaults."""
    base = CLIPTextConfig()
    counts = {key: count(config, key, getattr(base, key), file) for key in TEXT_COUNTS}
    act = config.get("hidden_act", base.hidden_act)
    if not isinstance(act, str) or act not in ACT2FN:
        raise InputError(f"{file}: hidden_act {shown(act)} is not an activation transformers has")
    if counts["hidden_size"] % counts["num_attention_heads"]:
        raise InputError(f"{file}: hidden_size {counts['hidden_size']} does not split into "
                         f"{counts['num_attention_heads']} attention heads")
    eps = scale(config, "layer_norm_eps", base.layer_norm_eps, file)
    return CLIPTextConfig(**counts, hidden_act=act, layer_norm_eps=eps)


def prediction_and_size(path: Path, prediction: str | None, unet_json: dict, vae_cfg: VAEConfig) -> tuple[str, int]:
    """What a folder's UNet predicts (the caller's word, else scheduler/scheduler_config.json's, else
    epsilon) and its native image side: unet sample_size (in latents) times the VAE's factor."""
    scheduler = path / "scheduler" / "scheduler_config.json"
    prediction = prediction or check_prediction(read_json(scheduler).get("prediction_type", "epsilon"), str(scheduler))
    size = unet_json.get("sample_size")   # 64 for 512 px, 96 for SD 2 at 768 px
    if size is not None and (not isinstance(size, int) or size < 1):
        raise InputError(f"{path}/unet/config.json: sample_size {size!r} is not a latent size")
    if size is None:
        return prediction, 768 if prediction == "v_prediction" else 512
    return prediction, size * 2 ** (len(vae_cfg.channels) - 1)


def load_folder(path: Path, device, dtype, prediction: str | None) -> StableDiffusion:
    """Configs say what the tensors cannot: heads, groups, VAE scale, activation, pad token, prediction;
    without them a UNet with Linear projections is taken for SD 2, as the single file's rule would."""
    unet_file, vae_file, text_file = weight_files(path)
    state = {"unet": read_safetensors(unet_file, device, dtype), "vae": read_safetensors(vae_file, device, dtype),
          "text": read_safetensors(text_file, device, dtype)}
    # older diffusers files (the v1.4 / v1.5 repositories among them) use other VAE attention names
    for old, new in VAE_LEGACY_ATTENTION:
        state["vae"] = {sub(k, old, new): v for k, v in state["vae"].items()}
    state["text"] = {k: v for k, v in state["text"].items() if not k.endswith("position_ids")}
    configs = {c: path / c / "config.json" for c in FOLDER}
    unet_json, vae_json, text_json = (read_json(file) for file in configs.values())
    for key, what in (("addition_embed_type", "an SDXL UNet"), ("class_embed_type", "an unCLIP (image variation) UNet")):
        if unet_json.get(key):
            raise InputError(f"{path}: {what} (unet/config.json has {key}); p2p supports Stable Diffusion v1 and "
                             "2.x text-to-image models only")
    sd2 = linear_projections(state["unet"])
    if "use_linear_projection" in unet_json and bool(unet_json["use_linear_projection"]) != sd2:
        raise InputError(f"{path}: unet/config.json has use_linear_projection {unet_json['use_linear_projection']}, "
                         f"but the UNet's proj_in weights are {'Linear' if sd2 else '1x1 conv'} weights")
    # diffusers' attention_head_dim holds head counts (a historical misnomer): SD v1's 8, SD 2's [5, 10, 20, 20]
    counts = unet_json.get("num_attention_heads") or unet_json.get("attention_head_dim")
    if counts is not None:
        heads = {"heads": counts}
    else:   # no config: the single file's rule, SD 2's 64-wide heads or SD v1's 8
        heads = {"head_dim": 64} if sd2 else {}
    unet_cfg = infer_unet(state["unet"], groups=count(unet_json, "norm_num_groups", 32, configs["unet"]), **heads)
    vae_cfg = infer_vae(state["vae"], groups=count(vae_json, "norm_num_groups", 32, configs["vae"]),
                        scale=scale(vae_json, "scaling_factor", 0.18215, configs["vae"]))
    act = "gelu" if sd2 else "quick_gelu"
    text_cfg = folder_text_config(text_json, configs["text_encoder"]) if text_json else infer_text(state["text"], act)
    tokenizer = path / "tokenizer" if present(path / "tokenizer" / "vocab.json") else TOKENIZER_DIR
    prediction, native = prediction_and_size(path, prediction, unet_json, vae_cfg)
    return build(state, path, unet_cfg, vae_cfg, text_cfg, tokenizer, pad_token(path / "tokenizer", sd2), prediction,
                 native)


def load(path, device="cpu", dtype=torch.float32, prediction: str | None = None) -> StableDiffusion:
    """Load SD v1 or 2.x from a single .safetensors file (LDM layout) or a diffusers-layout folder.

    | path       | a `.safetensors` file or a folder with unet/, vae/, text_encoder/           |
    | device     | "cpu", "cuda", "mps"; "meta": the architecture alone, from the headers      |
    | dtype      | torch.float32, torch.float16 or torch.bfloat16                                |
    | prediction | "epsilon" or "v_prediction"; None: the folder's scheduler config says (absent: |
    |            | epsilon), a v1 file is epsilon, an SD 2 file is refused (it cannot say)        |
    """
    check_device(device)
    if prediction is not None:
        check_prediction(prediction, "prediction")
    path = Path(path)
    weight_files(path)   # a missing path or folder part is named before anything is read
    loader = load_folder if path.is_dir() else load_single_file
    if torch.device(device).type != "meta":   # every strict check on the headers first: a missing
        loader(path, "meta", dtype, prediction)   # tensor is named in 0.2 s, not after reading 2.6 GB
    return loader(path, device, dtype, prediction)


