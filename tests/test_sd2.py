"""Stable Diffusion 2.x: the tiny SD 2 of scripts/make_tiny.py --sd2 in both layouts, the
architecture read off its tensors, the OpenCLIP rename, the refusals, and the command line."""
import json
import random
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from models import InputError
from models.checkpoint import load
from models.text import load_tokenizer
from p2p import align
from p2p.cli import main
from p2p.download import select_files

from conftest import script

make_tiny = script("make_tiny")
OPENCLIP = "cond_stage_model.model."
FAST = ["--steps", "2", "--height", "64", "--width", "64"]


@pytest.fixture(scope="module")
def sd2_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sd2")
    make_tiny.main([str(out), "--sd2"])
    return out


@pytest.fixture(scope="module")
def sd2_file(sd2_dir):
    return sd2_dir / "tiny-sd2.safetensors"


@pytest.fixture(scope="module")
def sd2(sd2_file):
    return load(sd2_file, prediction="epsilon")


def state(sd):
    return {**{f"unet.{k}": v for k, v in sd.unet.state_dict().items()},
            **{f"vae.{k}": v for k, v in sd.vae.state_dict().items()},
            **{f"text.{k}": v for k, v in sd.text.model.state_dict().items()}}


def refusal(tensors: dict, path, **kwargs) -> str:
    save_file(tensors, str(path))
    with pytest.raises(InputError) as e:
        load(path, **kwargs)
    message = str(e.value)
    assert "\n" not in message
    return message


# ---- both layouts, one model ----------------------------------------------------------

def test_both_layouts_load_the_same_model(sd2, sd2_dir):
    folder = load(sd2_dir / "tiny-sd2-diffusers")
    assert folder.unet.cfg == sd2.unet.cfg and folder.vae.cfg == sd2.vae.cfg
    a, b = state(sd2), state(folder)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    prompts = ["a cat riding a bicycle!", ""]
    assert torch.equal(folder.text.tokenize(prompts), sd2.text.tokenize(prompts))
    context = sd2.text.encode(prompts)
    assert torch.equal(folder.text.encode(prompts), context)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(folder.unet(x, 500, context), sd2.unet(x, 500, context))
    assert (folder.prediction, folder.native_size) == (sd2.prediction, sd2.native_size) == ("epsilon", 512)


def test_the_architecture_is_read_off_the_file(sd2):
    cfg = sd2.unet.cfg
    assert cfg == make_tiny.TINY_SD2_UNET
    assert [cfg.heads_at(i) for i in range(4)] == [1, 2, 2, 2]          # channels / 64
    assert {(s.level, s.heads) for s in sd2.unet.sites(8, 8)} == {(0, 1), (1, 2), (2, 2), (3, 2)}
    proj = sd2.unet.down_blocks[1].attentions[0].proj_in
    assert isinstance(proj, nn.Linear) and proj.weight.shape == (128, 128)
    assert cfg.context_dim == 128 == sd2.unet.mid_block.attentions[0].transformer_blocks[0].attn2.to_k.in_features
    text = sd2.text.model.config
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads) == (2, 128, 2)   # 2 of 3 blocks
    assert text.hidden_act == "gelu"
    assert sd2.text.pad_id == 0 == sd2.text.tokenizer.convert_tokens_to_ids("!")


def test_padding_is_the_exclamation_mark_but_a_prompts_one_stays_a_word(sd2):
    ids = sd2.text.tokenize(["a cat!", "wow !!"])
    tok = load_tokenizer()
    for row, prompt in zip(ids, ["a cat!", "wow !!"]):
        own = tok(prompt).input_ids                 # start, tokens, end: what the edits index
        assert row[:len(own)].tolist() == own and (row[len(own):] == 0).all()
        assert 0 not in own                         # "!" in a prompt is BPE's "!</w>" (256), as OpenCLIP reads it
    assert align.word_tokens(sd2.text.tokenizer, "a cat!") == align.word_tokens(tok, "a cat!") == [[1], [2, 3]]


def test_in_proj_splits_into_q_k_v_in_that_order(sd2, sd2_file):
    file = load_file(sd2_file)
    ours = sd2.text.model.state_dict()
    prefix = next(k for k in ours if k.endswith("encoder.layers.1.self_attn.q_proj.weight")).removesuffix(
        "encoder.layers.1.self_attn.q_proj.weight")
    block = f"{OPENCLIP}transformer.resblocks.1."
    w, b = file[f"{block}attn.in_proj_weight"], file[f"{block}attn.in_proj_bias"]
    for i, x in enumerate("qkv"):
        assert torch.equal(ours[f"{prefix}encoder.layers.1.self_attn.{x}_proj.weight"], w[128 * i:128 * (i + 1)])
        assert torch.equal(ours[f"{prefix}encoder.layers.1.self_attn.{x}_proj.bias"], b[128 * i:128 * (i + 1)])
    assert torch.equal(ours[f"{prefix}embeddings.position_embedding.weight"], file[f"{OPENCLIP}positional_embedding"])


def openclip_text(t: dict, ids: torch.Tensor, blocks: int) -> torch.Tensor:
    """OpenCLIP's text tower written out from the file's tensors: token + position embedding, pre-norm
    blocks of nn.MultiheadAttention under a causal mask and an exact-GELU MLP, then ln_final."""
    t = {k.removeprefix(OPENCLIP): v for k, v in t.items() if k.startswith(OPENCLIP)}
    width = t["token_embedding.weight"].shape[1]
    x = F.embedding(ids, t["token_embedding.weight"]) + t["positional_embedding"]
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    for i in range(blocks):
        p = f"transformer.resblocks.{i}."
        attn = nn.MultiheadAttention(width, width // 64, batch_first=True)
        attn.load_state_dict({k.removeprefix(p + "attn."): v for k, v in t.items() if k.startswith(p + "attn.")})
        h = F.layer_norm(x, (width,), t[p + "ln_1.weight"], t[p + "ln_1.bias"])
        x = x + attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        h = F.layer_norm(x, (width,), t[p + "ln_2.weight"], t[p + "ln_2.bias"])
        x = x + F.linear(F.gelu(F.linear(h, t[p + "mlp.c_fc.weight"], t[p + "mlp.c_fc.bias"])),
                         t[p + "mlp.c_proj.weight"], t[p + "mlp.c_proj.bias"])
    return F.layer_norm(x, (width,), t["ln_final.weight"], t["ln_final.bias"])


@torch.no_grad()
def test_text_encoder_is_openclips_penultimate_layer_then_ln_final(sd2, sd2_file):
    file, prompts = load_file(sd2_file), ["a photo of a cat", ""]
    ids = sd2.text.tokenize(prompts)
    ours = sd2.text.encode(prompts)
    torch.testing.assert_close(ours, openclip_text(file, ids, blocks=2), rtol=0, atol=1e-5)
    assert (ours - openclip_text(file, ids, blocks=3)).abs().max() > 0.1   # the last block is left out


# ---- refusals -------------------------------------------------------------------------

def test_a_truncated_text_tower_names_the_missing_tensor(sd2_file, tmp_path):
    full = load_file(sd2_file)
    cut = {k: v for k, v in full.items() if not k.startswith(f"{OPENCLIP}transformer.resblocks.1.")}
    message = refusal(cut, tmp_path / "cut.safetensors", prediction="epsilon")
    assert message == (f"text encoder: checkpoint lacks {OPENCLIP}transformer.resblocks.1.attn.in_proj_weight "
                       "(12 tensors missing)")
    one = {k: v for k, v in full.items() if k != f"{OPENCLIP}ln_final.bias"}
    assert refusal(one, tmp_path / "one.safetensors", prediction="epsilon").startswith(
        f"text encoder: checkpoint lacks {OPENCLIP}ln_final.bias")
    odd = dict(full, **{f"{OPENCLIP}visual.proj": torch.zeros(2)})
    assert refusal(odd, tmp_path / "odd.safetensors", prediction="epsilon") == \
        f"text encoder: checkpoint has unexpected {OPENCLIP}visual.proj"


def test_fuzz_every_damage_to_the_text_tower_is_one_line(sd2_file, tmp_path):
    full = load_file(sd2_file)
    tower = sorted(k for k in full if k.startswith(OPENCLIP) and ".resblocks.2." not in k
                   and not k.endswith(("text_projection", "logit_scale")))
    cases = [{n: v for n, v in full.items() if n != k} for k in random.Random(0).sample(tower, 12)]
    w = f"{OPENCLIP}transformer.resblocks.0.attn.in_proj_weight"
    for k, cut in [(w, full[w][:-1]), (w, full[w].flatten()), (f"{OPENCLIP}transformer.resblocks.1.attn.in_proj_bias",
                   torch.tensor(1.0)), (f"{OPENCLIP}positional_embedding", full[f"{OPENCLIP}positional_embedding"][:76])]:
        cases.append({**full, k: cut.contiguous()})
    for tensors in cases:
        assert refusal(tensors, tmp_path / "damaged.safetensors", device="meta", prediction="epsilon")


def test_sdxl_and_unclip_are_refused_by_name(sd2_file, tmp_path):
    full = load_file(sd2_file)
    sdxl = dict(full, **{"conditioner.embedders.1.model.ln_final.weight": torch.zeros(2)})
    assert "an SDXL checkpoint (key conditioner.embedders.1.model.ln_final.weight)" in \
        refusal(sdxl, tmp_path / "sdxl.safetensors", prediction="epsilon")
    unclip = dict(full, **{"model.diffusion_model.label_emb.0.0.weight": torch.zeros(2, 2)})
    assert "unCLIP" in refusal(unclip, tmp_path / "unclip.safetensors", prediction="epsilon")


def test_an_sd2_file_needs_the_prediction_type(sd2_file, tmp_path):
    for device in ("cpu", "meta"):
        with pytest.raises(InputError, match=r"is a Stable Diffusion 2\.x file, which does not say what its UNet "
                                             r"predicts: pass --prediction v_prediction \(SD 2\.0 / 2\.1 at 768 px\) "
                                             r"or --prediction epsilon \(the -base models at 512 px\)$"):
            load(sd2_file, device)
    v = load(sd2_file, prediction="v_prediction")
    assert (v.prediction, v.native_size) == ("v_prediction", 768)
    with pytest.raises(InputError, match="^prediction: 'sample' is not a prediction type p2p samples"):
        load(sd2_file, prediction="sample")


def test_prediction_and_size_come_from_the_folders_configs(tmp_path, sd2_dir, tiny_file):
    make_tiny.main([str(tmp_path / "v"), "--sd2", "--v"])
    folder = tmp_path / "v" / "tiny-sd2-diffusers"
    sd = load(folder, "meta")
    assert (sd.prediction, sd.native_size) == ("v_prediction", 768)      # sample_size 96 latents
    assert load(folder, "meta", prediction="epsilon").prediction == "epsilon"   # the caller overrides
    scheduler = folder / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({"prediction_type": "sample"}))
    with pytest.raises(InputError, match=r"scheduler_config.json: 'sample' is not a prediction type"):
        load(folder, "meta")
    scheduler.unlink()
    assert load(folder, "meta").prediction == "epsilon"
    v1 = load(tiny_file, "meta")
    assert (v1.prediction, v1.native_size, v1.text.pad_id) == ("epsilon", 512, 49407)


def test_folder_config_and_tensors_must_agree(sd2_dir, tmp_path):
    folder = tmp_path / "f"
    shutil.copytree(sd2_dir / "tiny-sd2-diffusers", folder)
    (folder / "tokenizer" / "special_tokens_map.json").unlink()   # no tokenizer config: SD 2 pads with "!"
    assert load(folder, "meta").text.pad_id == 0
    config = folder / "unet" / "config.json"
    good = json.loads(config.read_text())
    config.write_text(json.dumps(good | {"use_linear_projection": False}))
    with pytest.raises(InputError, match="use_linear_projection False, but the UNet's proj_in weights are Linear"):
        load(folder, "meta")
    config.write_text(json.dumps(good | {"attention_head_dim": [1, 2, 4, 2]}))
    with pytest.raises(InputError, match=r"head counts \[1, 2, 4, 2\] for widths \[64, 128, 128, 128\] do not share"):
        load(folder, "meta")
    config.write_text(json.dumps(good | {"addition_embed_type": "text_time"}))
    with pytest.raises(InputError, match="an SDXL UNet"):
        load(folder, "meta")
    config.write_text(json.dumps(good | {"class_embed_type": "projection"}))   # stabilityai/stable-diffusion-2-1-unclip
    with pytest.raises(InputError, match=r"an unCLIP \(image variation\) UNet \(unet/config.json has class_embed_type\)"):
        load(folder, "meta")


# ---- the command line -----------------------------------------------------------------

def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_sites_lists_heads_per_level(sd2_file, capsys):
    code, out, err = run(capsys, "sites", "--weights", sd2_file, "--prediction", "epsilon", "--height", "64",
                         "--width", "64")
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()[2:]]
    assert {(r[3], r[6]) for r in rows} == {("0", "1"), ("1", "2"), ("2", "2"), ("3", "2")}
    code, _, err = run(capsys, "sites", "--weights", sd2_file)
    assert code != 0 and len(err.strip().splitlines()) == 1 and "--prediction v_prediction" in err


def test_generate_and_edit_run_end_to_end(sd2_file, tmp_path, capsys):
    code, _, err = run(capsys, "generate", "--weights", sd2_file, "--prediction", "epsilon", "--prompt", "a cat",
                       *FAST, "--out", tmp_path / "g.png", "--latents-out", tmp_path / "g.safetensors")
    assert code == 0, err
    assert load_file(tmp_path / "g.safetensors")["latents"].isfinite().all()
    code, _, err = run(capsys, "edit", "--weights", sd2_file, "--prediction", "epsilon", "--source", "a cat!",
                       "--target", "a dog!", "--mode", "replace", *FAST, "--out", tmp_path / "e.png",
                       "--latents-out", tmp_path / "e.safetensors")
    assert code == 0, err
    assert load_file(tmp_path / "e.safetensors")["latents"].shape == (2, 4, 8, 8)
    code, _, err = run(capsys, "generate", "--weights", sd2_file, "--prompt", "a cat", *FAST,
                       "--out", tmp_path / "no.png")
    assert code != 0 and len(err.strip().splitlines()) == 1 and "--prediction epsilon" in err
    assert not (tmp_path / "no.png").exists()


# ---- p2p download ---------------------------------------------------------------------

# stabilityai/stable-diffusion-2-1-base as its main branch lists it (written by hand)
SD21_BASE = [
    ".gitattributes", "README.md", "model_index.json", "feature_extractor/preprocessor_config.json",
    "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.fp16.safetensors",
    "text_encoder/model.safetensors", "text_encoder/pytorch_model.bin", "text_encoder/pytorch_model.fp16.bin",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json", "unet/config.json", "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.bin", "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.safetensors", "v2-1_512-ema-pruned.ckpt", "v2-1_512-ema-pruned.safetensors",
    "v2-1_512-nonema-pruned.ckpt", "v2-1_512-nonema-pruned.safetensors", "vae/config.json",
    "vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.fp16.bin",
    "vae/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.safetensors",
]


def test_download_selects_the_sd2_folder_with_its_scheduler_and_tokenizer():
    assert select_files(SD21_BASE) == sorted([
        "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
        "text_encoder/model.safetensors", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"])
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in select_files(SD21_BASE, fp16=True)


def test_materialised_attention_scores_do_not_overflow_in_float16():
    """q.k = 64 * 80 * 80 > 65504: in float16 the scores would be inf and the softmax nan (SD 2.1's
    upcast_attention); they are computed in float32, as fused attention accumulates them."""
    from models.attention import Attention, Site
    from test_fused import Explicit
    layer = Attention(64, Site("x", "down", 0, False, 1)).half().requires_grad_(False)
    for p in layer.parameters():
        p.zero_()
    for proj, scale in ((layer.to_q, 80), (layer.to_k, 80), (layer.to_v, 1), (layer.to_out[0], 1)):
        proj.weight.copy_(torch.eye(64) * scale)
    x = torch.ones(1, 4, 64, dtype=torch.float16)
    with torch.no_grad():   # Explicit: every layer's probabilities materialised, unedited
        assert torch.equal(layer(x, edit=Explicit()), x) and torch.equal(layer(x), x)


def test_fields_left_to_the_model_follow_its_native_size(tiny_folder, tmp_path):
    """run.prepare fills them for every caller (the CLI, sweeps, bench pie, scripts, Python): the
    native size, and the blend and map resolution and self-attention limit that scale with it."""
    import json
    import shutil
    from types import SimpleNamespace
    from models.checkpoint import load
    from p2p.experiment import record, run
    from models.unet import UNet
    with torch.device("meta"):
        sd_unet = UNet()   # SD's: cross-attention at latents / 1, 2, 4
    sd = lambda native: SimpleNamespace(native_size=native, unet=sd_unet)  # noqa: E731
    assert run.defaults(sd(768), None, 640) == {"height": 768, "width": 640, "blend_res": 20, "self_max_tokens": 480}
    assert run.defaults(sd(768), 256, 256) == {"height": 256, "width": 256, "blend_res": 8, "self_max_tokens": 64}
    assert run.defaults(sd(512), 256, None) == {   # SD v1 keeps the paper's 16 and 256
        "height": 256, "width": 512, "blend_res": 16, "self_max_tokens": 256}
    # where no layer has maps at 1/32 of the side, the nearest finer side that has: at 72 px the
    # latents are 9, the maps 9, 5 and 3 (the 1/32 rule said 2, which the blend would then refuse)
    assert run.defaults(sd(768), 72, 72) == {"height": 72, "width": 72, "blend_res": 3, "self_max_tokens": 9}
    native_768 = tmp_path / "w768"
    shutil.copytree(tiny_folder, native_768)
    config = native_768 / "unet" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"sample_size": 96}))
    edit = {"source": "a cat", "targets": ["a dog"], "mode": "replace"}
    for weights, given, want in ((native_768, {}, (768, 768, 24, 576, 24)),
                                 (native_768, {"width": 640, "self_max_tokens": 100}, (768, 640, 20, 100, 20)),
                                 (tiny_folder, {}, (512, 512, 16, 256, 16))):
        plan = run.prepare(record.from_json(edit | given), weights, run.Outputs(maps=tmp_path / "m.png"),
                           model=load(weights, "meta"))
        r = plan.record
        assert (r.height, r.width, r.blend_res, r.self_max_tokens, plan.outputs.maps_res) == want
