"""Checkpoint loading: both layouts, architecture inference, strictness, dtype, the rename table."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from models import InputError
from models.checkpoint import load
from models.ldm import ldm_unet_key, ldm_vae_key
from models.unet import UNetConfig
from models.vae import VAEConfig

from conftest import script

make_tiny = script("make_tiny")


def state(sd):
    return {**{f"unet.{k}": v for k, v in sd.unet.state_dict().items()},
            **{f"vae.{k}": v for k, v in sd.vae.state_dict().items()},
            **{f"text.{k}": v for k, v in sd.text.model.state_dict().items()}}


def test_both_layouts_load_identical_modules(tiny, tiny_folder):
    folder = load(tiny_folder)
    assert folder.unet.cfg == tiny.unet.cfg and folder.vae.cfg == tiny.vae.cfg
    a, b = state(tiny), state(folder)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_architecture_is_read_off_the_tensors(tiny):
    assert tiny.unet.cfg == make_tiny.TINY_UNET
    assert tiny.vae.cfg == make_tiny.TINY_VAE
    assert (tiny.text.model.config.hidden_size, tiny.text.model.config.num_hidden_layers) == (128, 2)
    assert tiny.text.model.config.num_attention_heads == 2   # width / 64


def test_narrow_checkpoint_loads_without_any_config(tmp_path):
    unet_cfg = UNetConfig(channels=(32, 64), attention=(True, False), layers_per_block=1, context_dim=64)
    vae_cfg = VAEConfig(channels=(32, 64, 64), layers_per_block=1)
    unet, vae, text, _ = make_tiny.make(unet_cfg, vae_cfg, dict(width=64, layers=1, mlp=128), seed=5)
    make_tiny.write_single_file(tmp_path / "narrow.safetensors", unet, vae, text, unet_cfg, vae_cfg)
    sd = load(tmp_path / "narrow.safetensors")
    assert sd.unet.cfg == unet_cfg and sd.vae.cfg == vae_cfg
    assert torch.equal(sd.unet.state_dict()["conv_in.weight"], unet["conv_in.weight"])
    ctx = sd.text.encode(["a cat"])
    assert sd.unet(torch.zeros(1, 4, 8, 8), 10, ctx).shape == (1, 4, 8, 8)
    assert sd.vae.decode(torch.zeros(1, 4, 8, 8)).shape == (1, 3, 32, 32)   # 3 levels: latents are H/4


def test_nothing_is_left_on_the_meta_device(tiny):
    tensors = [*tiny.unet.parameters(), *tiny.vae.parameters(), *tiny.text.model.parameters(),
               *tiny.text.model.buffers()]
    assert all(t.device.type == "cpu" for t in tensors)
    assert not any(t.requires_grad for t in tensors)


def test_half_precision_load(tiny_file):
    sd = load(tiny_file, dtype=torch.bfloat16)
    assert sd.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in sd.text.model.parameters())


def test_old_diffusers_vae_attention_names_load(tiny_folder, tmp_path, tiny):
    """The v1.4/v1.5 repositories still ship query/key/value/proj_attn in vae/."""
    import shutil
    folder = tmp_path / "old"
    shutil.copytree(tiny_folder, folder)
    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    old = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
           .replace(".to_out.0.", ".proj_attn."): v for k, v in load_file(vae_file).items()}
    assert any(".proj_attn." in k for k in old)
    save_file(old, vae_file)
    assert torch.equal(load(folder).vae.state_dict()["encoder.mid_block.attentions.0.to_out.0.weight"],
                       tiny.vae.state_dict()["encoder.mid_block.attentions.0.to_out.0.weight"])


def test_strict_loading_names_the_first_problem(tiny_file, tmp_path):
    full = load_file(tiny_file)
    missing = dict(full)
    del missing["model.diffusion_model.out.2.bias"]
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(InputError, match=r"UNet: checkpoint lacks conv_out.bias \(1 tensors missing\)"):
        load(tmp_path / "missing.safetensors")

    extra = dict(full, **{"model.diffusion_model.extra.weight": torch.zeros(1)})
    save_file(extra, tmp_path / "extra.safetensors")
    with pytest.raises(InputError, match="UNet: checkpoint has unexpected extra.weight"):
        load(tmp_path / "extra.safetensors")

    wrong = dict(full)
    wrong["first_stage_model.decoder.conv_out.weight"] = torch.zeros(3, 32, 1, 1)
    save_file(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(InputError, match=r"VAE: decoder.conv_out.weight has shape \(3, 32, 1, 1\), "
                                         r"expected \(3, 32, 3, 3\)"):
        load(tmp_path / "wrong.safetensors")

    stray = dict(full, **{"some_other_model.weight": torch.zeros(1)})
    save_file(stray, tmp_path / "stray.safetensors")
    with pytest.raises(InputError, match="unexpected tensor some_other_model.weight"):
        load(tmp_path / "stray.safetensors")


@pytest.mark.parametrize("ldm, ours", [
    ("time_embed.0.weight", "time_embedding.linear_1.weight"),
    ("input_blocks.0.0.bias", "conv_in.bias"),
    ("input_blocks.1.0.in_layers.0.weight", "down_blocks.0.resnets.0.norm1.weight"),
    ("input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
     "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight"),
    ("input_blocks.3.0.op.weight", "down_blocks.0.downsamplers.0.conv.weight"),
    ("input_blocks.4.0.skip_connection.bias", "down_blocks.1.resnets.0.conv_shortcut.bias"),
    ("input_blocks.11.0.out_layers.3.weight", "down_blocks.3.resnets.1.conv2.weight"),
    ("middle_block.1.proj_in.weight", "mid_block.attentions.0.proj_in.weight"),
    ("middle_block.2.emb_layers.1.bias", "mid_block.resnets.1.time_emb_proj.bias"),
    ("output_blocks.2.1.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),
    ("output_blocks.5.2.conv.bias", "up_blocks.1.upsamplers.0.conv.bias"),
    ("output_blocks.5.1.norm.weight", "up_blocks.1.attentions.2.norm.weight"),
    ("output_blocks.11.1.proj_out.weight", "up_blocks.3.attentions.2.proj_out.weight"),
    ("out.2.weight", "conv_out.weight"),
])
def test_ldm_unet_names_of_sd_v1(ldm, ours):
    """Hand-checked against the real SD v1.5 single file (2 res blocks per level)."""
    assert ldm_unet_key(ldm, layers=2) == ours


@pytest.mark.parametrize("ldm, ours", [
    ("encoder.down.1.block.0.nin_shortcut.weight", "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"),
    ("encoder.down.2.downsample.conv.bias", "encoder.down_blocks.2.downsamplers.0.conv.bias"),
    ("decoder.up.3.block.2.conv1.weight", "decoder.up_blocks.0.resnets.2.conv1.weight"),
    ("decoder.up.1.upsample.conv.weight", "decoder.up_blocks.2.upsamplers.0.conv.weight"),
    ("decoder.mid.attn_1.proj_out.bias", "decoder.mid_block.attentions.0.to_out.0.bias"),
    ("encoder.mid.attn_1.norm.weight", "encoder.mid_block.attentions.0.group_norm.weight"),
    ("encoder.mid.block_2.norm2.bias", "encoder.mid_block.resnets.1.norm2.bias"),
    ("encoder.norm_out.weight", "encoder.conv_norm_out.weight"),
])
def test_ldm_vae_names_of_sd_v1(ldm, ours):
    assert ldm_vae_key(ldm, levels=4) == ours
