"""The single-file LDM layout (CompVis and Stability releases) and its explicit rename into our
module names, which are the diffusers folder's: the UNet's input / middle / output blocks, the
autoencoder, and the text encoder, OpenAI CLIP (SD v1, already in transformers' names) or the
text tower of OpenCLIP (SD 2), renamed into a transformers CLIPTextModel.
"""
import re

from . import InputError

LDM_PREFIXES = {"model.diffusion_model.": "unet", "first_stage_model.": "vae",
                "cond_stage_model.transformer.": "text",       # SD v1: OpenAI CLIP ViT-L/14
                "cond_stage_model.model.": "openclip"}         # SD 2: OpenCLIP ViT-H/14's text tower
OTHER_MODELS = {"conditioner.embedders.": "an SDXL checkpoint",
                "model.diffusion_model.label_emb.": "an SDXL or unCLIP checkpoint"}


def split_ldm(state: dict) -> dict[str, dict]:
    """Single-file state dict -> {"unet", "vae", "text", "openclip"} with LDM names inside."""
    for marker, what in OTHER_MODELS.items():
        found = next((k for k in state if k.startswith(marker)), None)
        if found is not None:
            raise InputError(f"found {what} (key {found}); p2p supports Stable Diffusion v1 and 2.x only")
    parts = {part: {} for part in LDM_PREFIXES.values()}
    for key, value in state.items():
        # dropped: EMA copies, LatentDiffusion's top-level schedule buffers, CLIP's position_ids
        if key.startswith("model_ema.") or "." not in key or key.endswith("position_ids"):
            continue
        prefix = next((p for p in LDM_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise InputError(f"unexpected tensor {key} for a Stable Diffusion v1 or 2.x checkpoint")
        parts[LDM_PREFIXES[prefix]][key[len(prefix):]] = value
    if not parts["unet"]:
        raise InputError(f"not a Stable Diffusion checkpoint: no model.diffusion_model.* tensors "
                         f"(found e.g. {', '.join(list(state)[:3])})")
    if parts["text"] and parts["openclip"]:
        raise InputError("the checkpoint has two text encoders (cond_stage_model.transformer.* and "
                         "cond_stage_model.model.*)")
    return parts


RESBLOCK = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
            ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut")]
VAE_NAMES = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"),
             ("mid.block_1", "mid_block.resnets.0"), ("mid.block_2", "mid_block.resnets.1"),
             ("mid.attn_1.norm", "mid_block.attentions.0.group_norm"),
             ("mid.attn_1.q", "mid_block.attentions.0.to_q"), ("mid.attn_1.k", "mid_block.attentions.0.to_k"),
             ("mid.attn_1.v", "mid_block.attentions.0.to_v"),
             ("mid.attn_1.proj_out", "mid_block.attentions.0.to_out.0")]
# OpenCLIP's text tower -> CLIPTextModel (each file name: our names, the tensor split evenly on dim 0)
OPENCLIP = {"token_embedding.weight": ["embeddings.token_embedding.weight"],
            "positional_embedding": ["embeddings.position_embedding.weight"],   # a raw [77, width] tensor
            "ln_final.weight": ["final_layer_norm.weight"], "ln_final.bias": ["final_layer_norm.bias"]}
OPENCLIP_BLOCK = [("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                  ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]
OPENCLIP_UNUSED = ("text_projection", "logit_scale")   # CLIP's contrastive head: SD 2 reads token states


def indices(state: dict, pattern: str) -> list[int]:
    return sorted({int(m[1]) for k in state if (m := re.match(pattern, k))})


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


def openclip_names(layers: int) -> dict[str, list[str]]:
    """Every tensor name an OpenCLIP text tower of `layers` used blocks has -> our names."""
    names = dict(OPENCLIP)
    for i in range(layers):
        block, ours = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for p in ("weight", "bias"):
            # nn.MultiheadAttention stacks the q, k and v projections, in that order, on dim 0
            names[f"{block}attn.in_proj_{p}"] = [f"{ours}self_attn.{x}_proj.{p}" for x in "qkv"]
            names |= {f"{block}{old}.{p}": [f"{ours}{new}.{p}"] for old, new in OPENCLIP_BLOCK}
    return names


def openclip_to_clip(state: dict) -> dict:
    """OpenCLIP's text tower -> CLIPTextModel tensors. SD 2 reads the output of the penultimate
    block (then ln_final): a file with N resblocks gives an N - 1 layer model, the last one unused."""
    blocks = indices(state, r"transformer\.resblocks\.(\d+)\.")
    layers = blocks[-1] if blocks else 0
    if layers == 0:
        raise InputError("text encoder: the OpenCLIP tower needs at least 2 resblocks "
                         "(cond_stage_model.model.transformer.resblocks.*), the last one unused")
    names = openclip_names(layers)
    if missing := [k for k in names if k not in state]:
        raise InputError(f"text encoder: checkpoint lacks cond_stage_model.model.{missing[0]} "
                         f"({len(missing)} tensors missing)")
    unused = [k for k in state if k not in names and k not in OPENCLIP_UNUSED
              and not k.startswith(f"transformer.resblocks.{layers}.")]
    if unused:
        raise InputError(f"text encoder: checkpoint has unexpected cond_stage_model.model.{unused[0]}")
    out = {}
    for key, ours in names.items():
        if state[key].ndim == 0 or state[key].shape[0] % len(ours):
            raise InputError(f"text encoder: cond_stage_model.model.{key} has shape {tuple(state[key].shape)}, "
                             f"which does not split into {len(ours)}")
        out |= {f"text_model.{n}": t for n, t in zip(ours, state[key].chunk(len(ours)))}
    return out


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
    if parts["openclip"]:
        text = openclip_to_clip(parts["openclip"])
    else:
        text = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in parts["text"].items()}
    return {"unet": {ldm_unet_key(k, layers): v for k, v in unet.items()}, "vae": vae, "text": text}
