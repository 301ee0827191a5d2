"""Write a seeded random Stable Diffusion v1 (or 2.x) checkpoint in both real layouts, from the same tensors.

    python scripts/make_tiny.py OUT_DIR            # tiny: OUT_DIR/tiny.safetensors + OUT_DIR/tiny-diffusers/
    python scripts/make_tiny.py OUT_DIR --full     # SD v1.5-shaped, fp16, single file (~2 GB; do not commit)
    python scripts/make_tiny.py OUT_DIR --sd2      # tiny SD 2: OUT_DIR/tiny-sd2.safetensors + tiny-sd2-diffusers/
    python scripts/make_tiny.py OUT_DIR --sd2 --v  # the same, its scheduler config saying v_prediction
    python scripts/make_tiny.py OUT_DIR --full --sd2  # SD 2.1-shaped, fp16, single file (~2.6 GB; do not commit)

The tiny model keeps the full SD v1 block structure (four UNet levels with attention on the
first three, 2 res blocks per level, 8 heads, GroupNorm 32; four VAE levels so latents stay
H/8; a 2-layer CLIP text model over the real 49408-token vocabulary) at small widths. Norm
weights and biases are perturbed too, so no layer is an identity. The single-file layout is
written by a rename of its own (diffusers -> LDM, the reverse of what models/checkpoint.py
reads), so the two directions are checked against each other by the tests.

The tiny SD 2 has SD 2's structure: Linear projections in the transformers, 64-wide heads (1, 2,
2, 2 for channels 64, 128, 128, 128), and the text tower of OpenCLIP (exact GELU, 2 heads of 64)
written as OpenCLIP names it in the single file: 3 resblocks, of which SD 2 reads the first 2
(as it reads 23 of ViT-H/14's 24), and the unused text_projection and logit_scale; in the folder
it is the 2-layer CLIPTextModel, the tokenizer pads with "!". The full-size SD 2.1 has the same
structure at v2-inference.yaml's sizes: heads 5, 10, 20, 20 and ViT-H/14's text tower (width 1024,
24 resblocks of 16 heads, MLP 4096).
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.text import TOKENIZER_DIR, text_config  # noqa: E402
from models.unet import UNet, UNetConfig  # noqa: E402
from models.vae import VAE, VAEConfig  # noqa: E402

TINY_UNET = UNetConfig(channels=(32, 64, 64, 64), context_dim=128)
TINY_VAE = VAEConfig(channels=(32, 32, 64, 64))
TINY_TEXT = dict(width=128, layers=2, mlp=256)
TINY_SD2_UNET = UNetConfig(channels=(64, 128, 128, 128), context_dim=128, head_dim=64, linear_projection=True)
TINY_SD2_TEXT = dict(width=128, layers=2, mlp=512, act="gelu")
SD2_UNET = UNetConfig(context_dim=1024, head_dim=64, linear_projection=True)
SD2_TEXT = dict(width=1024, layers=23, mlp=4096, act="gelu")   # the 23 of ViT-H/14's 24 resblocks SD 2 reads


COMPONENTS = {"unet": "unet/diffusion_pytorch_model.safetensors",    # the folder layout's weight files
              "vae": "vae/diffusion_pytorch_model.safetensors",
              "text_encoder": "text_encoder/model.safetensors"}


def fingerprint(folder: Path) -> torch.Tensor:
    """[components, 3] float64: tensor count, sum and sum of |w| of each weight file of a folder;
    the goldens record it so a test tells "make_tiny changed" from "the network is wrong"."""
    rows = []
    for file in COMPONENTS.values():
        sd = load_file(str(folder / file))
        rows.append([float(len(sd)), sum(sd[k].double().sum().item() for k in sorted(sd)),
                     sum(sd[k].double().abs().sum().item() for k in sorted(sd))])
    return torch.tensor(rows, dtype=torch.float64)


def random_weights(shapes: dict[str, torch.Size], seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Seeded, non-degenerate weights: fan-in scaled matrices, norms near 1, small biases."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if len(shape) == 1 and "norm" in name and name.endswith("weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:
            t = 0.05 * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) / float(np.prod(shape[1:])) ** 0.5
        out[name] = t.to(dtype)
    return out


def shapes_of(module: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in module.state_dict().items()}


# ---- diffusers -> LDM names (written independently of models/checkpoint.py) ----------------

RES_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_key_to_ldm(key: str, cfg: UNetConfig) -> str:
    n, parts = cfg.layers_per_block, key.split(".")
    simple = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    if parts[0] in simple:
        return ".".join([simple[parts[0]]] + parts[1:])
    if parts[0] == "time_embedding":
        return f"time_embed.{0 if parts[1] == 'linear_1' else 2}.{parts[2]}"
    if parts[0] == "mid_block":
        block = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(parts[1], parts[2])]
        head, rest = f"middle_block.{block}", parts[3:]
    elif parts[0] == "down_blocks":
        i, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":
            return f"input_blocks.{1 + i * (n + 1) + n}.0.op.{parts[-1]}"
        j = int(parts[3])
        head, rest = f"input_blocks.{1 + i * (n + 1) + j}.{0 if kind == 'resnets' else 1}", parts[4:]
    else:  # up_blocks
        i, kind = int(parts[1]), parts[2]
        level = len(cfg.channels) - 1 - i
        if kind == "upsamplers":
            return f"output_blocks.{i * (n + 1) + n}.{2 if cfg.attention[level] else 1}.conv.{parts[-1]}"
        j = int(parts[3])
        head, rest = f"output_blocks.{i * (n + 1) + j}.{0 if kind == 'resnets' else 1}", parts[4:]
    if head.endswith(".0") or head in ("middle_block.0", "middle_block.2"):   # a res block
        rest = [RES_LDM.get(rest[0], rest[0])] + rest[1:]
    return ".".join([head] + rest)


def vae_key_to_ldm(key: str, levels: int) -> str:
    parts = key.split(".")
    side = parts[0]
    if side in ("quant_conv", "post_quant_conv"):
        return key
    p = parts[1:]
    if p[0] in ("conv_in", "conv_out"):
        return key
    if p[0] == "conv_norm_out":
        return f"{side}.norm_out.{p[1]}"
    if p[0] == "mid_block":
        if p[1] == "attentions":
            names = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
            return f"{side}.mid.attn_1.{names[p[3]]}.{p[-1]}"
        rest = p[3:]
        head = f"{side}.mid.block_{int(p[2]) + 1}"
    elif p[0] == "down_blocks":
        if p[2] == "downsamplers":
            return f"{side}.down.{p[1]}.downsample.conv.{p[-1]}"
        head, rest = f"{side}.down.{p[1]}.block.{p[3]}", p[4:]
    else:  # decoder.up_blocks: LDM counts decoder levels from the lowest resolution up
        level = levels - 1 - int(p[1])
        if p[2] == "upsamplers":
            return f"{side}.up.{level}.upsample.conv.{p[-1]}"
        head, rest = f"{side}.up.{level}.block.{p[3]}", p[4:]
    rest = ["nin_shortcut" if rest[0] == "conv_shortcut" else rest[0]] + rest[1:]
    return ".".join([head] + rest)


CLIP_TO_OPENCLIP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def text_to_openclip(text_sd: dict) -> dict:
    """CLIPTextModel tensors -> the names of OpenCLIP's text tower, with q, k and v stacked into
    in_proj (in that order) as nn.MultiheadAttention keeps them."""
    out = {}
    for key, v in text_sd.items():
        key = key.removeprefix("text_model.")
        if key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = v
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = v            # a bare [77, width] parameter in OpenCLIP
        elif key.startswith("final_layer_norm."):
            out["ln_final." + key.split(".")[-1]] = v
        else:                                          # encoder.layers.I.NAME.weight|bias
            _, _, i, *name, p = key.split(".")
            name, block = ".".join(name), f"transformer.resblocks.{i}."
            if name == "self_attn.q_proj":
                qkv = [text_sd[f"text_model.encoder.layers.{i}.self_attn.{x}_proj.{p}"] for x in "qkv"]
                out[f"{block}attn.in_proj_{p}"] = torch.cat(qkv)
            elif name not in ("self_attn.k_proj", "self_attn.v_proj"):
                out[f"{block}{CLIP_TO_OPENCLIP[name]}.{p}"] = v
    return out


def openclip_unused(width: int, mlp: int, layers: int, seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """What an OpenCLIP text tower has and SD 2 does not read: the last resblock (index `layers`),
    the projection into CLIP's joint embedding and the logit scale."""
    b = f"transformer.resblocks.{layers}."
    shapes = {"text_projection": (width, width), "logit_scale": (),
              f"{b}attn.in_proj_weight": (3 * width, width), f"{b}attn.in_proj_bias": (3 * width,),
              f"{b}attn.out_proj.weight": (width, width), f"{b}mlp.c_fc.weight": (mlp, width),
              f"{b}mlp.c_fc.bias": (mlp,), f"{b}mlp.c_proj.weight": (width, mlp),
              **{f"{b}{n}": (width,) for n in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias",
                                               "attn.out_proj.bias", "mlp.c_proj.bias")}}
    return random_weights({k: torch.Size(v) for k, v in shapes.items()}, seed, dtype)


def ldm_schedule_buffers() -> dict[str, torch.Tensor]:
    """The DDPM buffers a real LDM checkpoint carries (float64 numpy maths, stored float32)."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    return {"betas": torch.tensor(betas, dtype=torch.float32),
            "alphas_cumprod": torch.tensor(alphas_cumprod, dtype=torch.float32),
            "alphas_cumprod_prev": torch.tensor(np.append(1.0, alphas_cumprod[:-1]), dtype=torch.float32)}


# ---- writing --------------------------------------------------------------------------

def make(unet_cfg: UNetConfig, vae_cfg: VAEConfig, text: dict, seed: int, dtype=torch.float32):
    """The three state dicts in diffusers names, and the text config."""
    tcfg = text_config(**text)
    with torch.device("meta"):
        unet, vae, clip = UNet(unet_cfg), VAE(vae_cfg), CLIPTextModel(tcfg)
    # checkpoints name CLIP's tensors text_model.*, whatever the installed transformers calls them
    text_shapes = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in shapes_of(clip).items()}
    return (random_weights(shapes_of(unet), seed, dtype), random_weights(shapes_of(vae), seed + 1, dtype),
            random_weights(text_shapes, seed + 2, dtype), tcfg)


def write_single_file(path: Path, unet_sd, vae_sd, text_sd, unet_cfg: UNetConfig, vae_cfg: VAEConfig,
                      openclip_extra: dict | None = None):
    """The LDM layout; the text encoder as OpenAI CLIP (SD v1), or as OpenCLIP's text tower plus
    `openclip_extra`, its tensors SD 2 does not read."""
    sd = {f"model.diffusion_model.{unet_key_to_ldm(k, unet_cfg)}": v for k, v in unet_sd.items()}
    for k, v in vae_sd.items():
        ldm = vae_key_to_ldm(k, len(vae_cfg.channels))
        sd[f"first_stage_model.{ldm}"] = v[:, :, None, None] if ".attn_1." in ldm and v.ndim == 2 else v
    if openclip_extra is None:
        sd.update({f"cond_stage_model.transformer.{k}": v for k, v in text_sd.items()})
        sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    else:
        sd.update({f"cond_stage_model.model.{k}": v for k, v in (text_to_openclip(text_sd) | openclip_extra).items()})
    sd.update(ldm_schedule_buffers())
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


def write_folder(folder: Path, unet_sd, vae_sd, text_sd, unet_cfg: UNetConfig, vae_cfg: VAEConfig, tcfg,
                 pad: str | None = None, prediction: str | None = None, sample_size: int = 64):
    """The diffusers layout; `pad` and `prediction` (SD 2) add tokenizer/special_tokens_map.json and
    scheduler/scheduler_config.json."""
    for sub in ("unet", "vae", "text_encoder", "tokenizer"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    levels = len(unet_cfg.channels)
    heads = [unet_cfg.heads_at(i) for i in range(levels)]   # diffusers calls these counts attention_head_dim
    unet_json = {
        "_class_name": "UNet2DConditionModel", "in_channels": unet_cfg.in_channels,
        "out_channels": unet_cfg.out_channels, "block_out_channels": list(unet_cfg.channels),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in unet_cfg.attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in unet_cfg.attention[::-1]],
        "layers_per_block": unet_cfg.layers_per_block, "cross_attention_dim": unet_cfg.context_dim,
        "attention_head_dim": heads[0] if len(set(heads)) == 1 else heads, "norm_num_groups": unet_cfg.groups,
        "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1, "act_fn": "silu",
        "center_input_sample": False, "mid_block_scale_factor": 1, "sample_size": sample_size}
    if unet_cfg.linear_projection:
        unet_json["use_linear_projection"] = True
    vae_json = {
        "_class_name": "AutoencoderKL", "in_channels": vae_cfg.image_channels, "out_channels": vae_cfg.image_channels,
        "latent_channels": vae_cfg.latent_channels, "block_out_channels": list(vae_cfg.channels),
        "down_block_types": ["DownEncoderBlock2D"] * len(vae_cfg.channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(vae_cfg.channels),
        "layers_per_block": vae_cfg.layers_per_block, "norm_num_groups": vae_cfg.groups, "act_fn": "silu",
        "scaling_factor": vae_cfg.scale, "sample_size": 512}
    assert levels == len(unet_json["down_block_types"])
    (folder / "unet" / "config.json").write_text(json.dumps(unet_json, indent=2))
    (folder / "vae" / "config.json").write_text(json.dumps(vae_json, indent=2))
    tcfg.to_json_file(str(folder / "text_encoder" / "config.json"))
    for name, sd in (("unet", unet_sd), ("vae", vae_sd), ("text_encoder", text_sd)):
        save_file(sd, str(folder / COMPONENTS[name]))
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(TOKENIZER_DIR / name, folder / "tokenizer" / name)
    if pad is not None:
        special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad,
                   "unk_token": "<|endoftext|>"}
        (folder / "tokenizer" / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    if prediction is not None:   # SD 2's DDIM scheduler config
        (folder / "scheduler").mkdir(exist_ok=True)
        scheduler = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                     "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "clip_sample": False,
                     "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": prediction}
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="directory to write into")
    ap.add_argument("--full", action="store_true", help="full size (SD v1.5's shapes; with --sd2, SD 2.1's), fp16, single file only")
    ap.add_argument("--sd2", action="store_true", help="SD 2 instead: tiny-sd2.safetensors, tiny-sd2-diffusers/; "
                    "with --full, SD 2.1 shapes: sd21-random-fp16.safetensors")
    ap.add_argument("--v", action="store_true", help="with --sd2: the folder's scheduler says v_prediction")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.v and (args.full or not args.sd2):
        ap.error("--v goes with --sd2 alone (a single file does not say what its UNet predicts)")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.sd2:
        write_sd2(args.out, args.seed, "v_prediction" if args.v else "epsilon", args.full)
        return
    if args.full:
        unet_cfg, vae_cfg = UNetConfig(), VAEConfig()
        unet_sd, vae_sd, text_sd, _ = make(unet_cfg, vae_cfg, {}, args.seed, torch.float16)
        write_single_file(args.out / "sd15-random-fp16.safetensors", unet_sd, vae_sd, text_sd, unet_cfg, vae_cfg)
        print(f"wrote {args.out / 'sd15-random-fp16.safetensors'} (random SD v1.5-shaped weights: cost only)")
        return
    unet_sd, vae_sd, text_sd, tcfg = make(TINY_UNET, TINY_VAE, TINY_TEXT, args.seed)
    write_single_file(args.out / "tiny.safetensors", unet_sd, vae_sd, text_sd, TINY_UNET, TINY_VAE)
    write_folder(args.out / "tiny-diffusers", unet_sd, vae_sd, text_sd, TINY_UNET, TINY_VAE, tcfg)
    print(f"wrote {args.out / 'tiny.safetensors'} and {args.out / 'tiny-diffusers'}/ (random tiny SD v1: "
          "tests only)")


def write_sd2(out: Path, seed: int, prediction: str, full: bool = False):
    """The tiny SD 2 in both layouts, from the same tensors, or SD 2.1's shapes in fp16 as a single
    file (the VAE is SD v1's, as in SD 2)."""
    unet_cfg, vae_cfg, t = (SD2_UNET, VAEConfig(), SD2_TEXT) if full else (TINY_SD2_UNET, TINY_VAE, TINY_SD2_TEXT)
    dtype = torch.float16 if full else torch.float32
    unet_sd, vae_sd, text_sd, tcfg = make(unet_cfg, vae_cfg, t, seed, dtype)
    extra = openclip_unused(t["width"], t["mlp"], t["layers"], seed + 3, dtype)
    if full:
        path = out / "sd21-random-fp16.safetensors"
        write_single_file(path, unet_sd, vae_sd, text_sd, unet_cfg, vae_cfg, extra)
        print(f"wrote {path} (random SD 2.1-shaped weights: cost only)")
        return
    write_single_file(out / "tiny-sd2.safetensors", unet_sd, vae_sd, text_sd, unet_cfg, vae_cfg, extra)
    write_folder(out / "tiny-sd2-diffusers", unet_sd, vae_sd, text_sd, unet_cfg, vae_cfg, tcfg, pad="!",
                 prediction=prediction, sample_size=96 if prediction == "v_prediction" else 64)
    print(f"wrote {out / 'tiny-sd2.safetensors'} and {out / 'tiny-sd2-diffusers'}/ (random tiny SD 2, "
          f"{prediction}: tests only)")


if __name__ == "__main__":
    main()
