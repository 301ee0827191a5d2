"""Choosing attention layers: `p2p sites`, --cross-sites / --self-sites on edit, --sites on maps."""
import pytest
import torch
from safetensors.torch import load_file

from models import files
from models.attention import Site
from models.checkpoint import load
from p2p import edits
from p2p.blend import MaskBlend
from p2p.cli import main
from p2p.experiment.record import sites

CAT, DOG = "a cat riding a bicycle", "a dog riding a bicycle"
FAST = ["--steps", "4", "--height", "128", "--width", "128"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_sites_lists_every_layer_in_call_order_from_the_headers_alone(tiny_file, tiny_folder, capsys,
                                                                     monkeypatch):
    code, out, err = run(capsys, "sites", "--weights", tiny_file, "--height", "256", "--width", "256")
    assert code == 0, err
    lines = out.splitlines()
    # tiny: attention on 3 of 4 levels; down 3 x 2 blocks, mid 1, up 3 x 3 blocks; self + cross each
    assert lines[0] == "tiny.safetensors at 256x256 (latents 32x32): 32 attention layers"
    rows = [line.split() for line in lines[2:]]
    assert rows[0] == ["0", "down_blocks.0.attentions.0.transformer_blocks.0.attn1", "down", "0", "32x32", "self",
                       "8", "1024", "down:32"]
    assert rows[13][1:] == ["mid_block.attentions.0.transformer_blocks.0.attn2", "mid", "3", "4x4", "cross", "8",
                            "77", "mid:4"]
    assert rows[-1][1:3] == ["up_blocks.3.attentions.2.transformer_blocks.0.attn2", "up"]
    # the order a forward pass calls them in
    tiny, seen = load(tiny_file), []

    class Every:
        def wants(self, site):
            return True

        def fused(self, q, k, v, site):
            return None

        def __call__(self, probs, site):
            seen.append(site.name)
            return probs

    tiny.unet(torch.zeros(2, 4, 32, 32), 500, torch.zeros(2, 77, 128), edit=Every())
    assert [r[1] for r in rows] == seen
    assert run(capsys, "sites", "--weights", tiny_folder, "--height", "256", "--width", "256")[1] == \
        out.replace("tiny.safetensors", "tiny-diffusers")
    # only the header is read: the tensors are never opened (a file cut short is refused by its
    # size alone, tests/test_models_hardening.py::test_a_file_cut_short_is_named)
    monkeypatch.setattr(files, "safe_open", lambda *args, **kwargs: pytest.fail("p2p sites opened the tensors"))
    assert run(capsys, "sites", "--weights", tiny_file, "--height", "256", "--width", "256")[1] == out


def test_site_items_parse_and_pick():
    assert sites("down:16,up:any") == (("down", 16), ("up", "any"))
    assert sites("") == () and sites([["mid", 8]]) == (("mid", 8),)
    for bad in ("side:16", "up", "up:0", "up:x"):
        with pytest.raises(ValueError, match="a site is PLACE:SIDE"):
            sites(bad)
    up16 = Site("up_blocks.1.attentions.0.transformer_blocks.0.attn2", "up", 1, True, 8, (16, 16))
    assert edits.picks((("up", 16),), up16) and edits.picks((("any", "any"),), up16)
    assert not edits.picks((("down", 16), ("up", 32)), up16)


def test_cross_and_self_sites_choose_where_the_edit_acts(tiny_file, tmp_path, capsys):
    def edit(*extra):
        code, _, err = run(capsys, "edit", "--weights", tiny_file, "--source", CAT, "--target", DOG,
                           "--mode", "replace", *extra, *FAST, "--out", tmp_path / "e.png",
                           "--latents-out", tmp_path / "e.safetensors")
        assert code == 0, err
        return load_file(tmp_path / "e.safetensors")["latents"]

    default = edit()
    assert torch.equal(edit("--cross-sites", "any:any", "--self-sites", "any:any"), default)
    only_up = edit("--cross-sites", "up:any")
    # the source is never edited (fused and materialised attention differ in the last bits only)
    assert torch.allclose(only_up[0], default[0], atol=1e-4) and (only_up[1] - default[1]).abs().max() > 1e-2
    no_self = edit("--self-sites", "mid:2")     # the tiny model's 2x2 mid block alone
    assert (no_self[1] - default[1]).abs().max() > 1e-2 and (no_self[1] - only_up[1]).abs().max() > 1e-2


def test_prompt_to_prompt_edits_only_the_chosen_sites():
    tok = __import__("models.text", fromlist=["load_tokenizer"]).load_tokenizer()
    p2p = edits.PromptToPrompt(tok, [CAT, DOG], 10, cross=edits.Replace(tok, [CAT, DOG]), self_steps=1.0,
                               cross_sites=lambda s: edits.picks((("up", 16),), s),
                               self_sites=lambda s: edits.picks((("down", 8), ("mid", "any")), s))
    site = lambda place, res, cross: Site("x", place, 0, cross, 8, (res, res))
    assert p2p.edits(site("up", 16, True)) and not p2p.edits(site("down", 16, True))
    assert p2p.edits(site("down", 8, False)) and p2p.edits(site("mid", 2, False))
    assert not p2p.edits(site("up", 8, False)) and not p2p.edits(site("up", 8, True))


@pytest.mark.parametrize("argv, words", [
    (["--cross-sites", "up:32"], "cross_sites (--cross-sites) up:32: at 128x128 this model has no cross-attention "
                                 "layer there; it has down:16, down:8, down:4, mid:2, up:4, up:8, up:16"),
    (["--self-sites", "up:16", "--self-max-tokens", "64"], "self_sites (--self-sites) up:16: those layers have 256 "
                                                          "keys or more, above the self_max_tokens"),
    (["--cross-sites", "side:16"], "--cross-sites: a site is PLACE:SIDE, PLACE one of down, mid, up, any"),
])
def test_bad_sites_are_one_line_before_sampling(argv, words, tiny_file, tmp_path, capsys):
    code, _, err = run(capsys, "edit", "--weights", tiny_file, "--source", CAT, "--target", DOG, "--mode", "replace",
                       *argv, *FAST, "--out", tmp_path / "e.png")
    assert code == 2 and words in err and "sampling" not in err, err
    assert not (tmp_path / "e.png").exists()


def test_maps_average_the_chosen_sites(tiny_file, tmp_path, capsys):
    code, _, err = run(capsys, "maps", "--weights", tiny_file, "--prompt", CAT, "--sites", "up:16", *FAST,
                       "--out", tmp_path / "m.png")
    assert code == 0, err
    code, _, err = run(capsys, "maps", "--weights", tiny_file, "--prompt", CAT, "--sites", "mid:2", *FAST,
                       "--out", tmp_path / "n.png")
    assert code == 2 and "--sites mid:2 picks no layer at --res 16" in err, err


# ---- a drawn region: --blend-mask ------------------------------------------------------------

def test_mask_blend_keeps_the_source_outside_the_drawn_region():
    region = torch.zeros(64, 64, dtype=torch.bool)
    region[:, :32] = True                                       # the left half, at image size
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = MaskBlend(region)(x, None, 0)
    assert torch.equal(out[:, :, :, 4:], x[:1, :, :, 4:].expand(3, -1, -1, -1))   # right: the source
    assert torch.allclose(out[:, :, :, :4], x[:, :, :, :4], atol=1e-6)              # left: each its own
    assert torch.equal(MaskBlend(region, start=2)(x, None, 1), x)


def test_blend_mask_on_the_command_line(tiny_file, tmp_path, capsys):
    from PIL import Image
    import numpy as np
    pixels = np.zeros((128, 128), dtype=np.uint8)
    pixels[:64] = 255                                           # the top half is the region
    Image.fromarray(pixels).save(tmp_path / "mask.png")
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "black.png")
    base = ["edit", "--weights", tiny_file, "--source", CAT, "--target", DOG, "--mode", "replace", *FAST]
    code, _, err = run(capsys, *base, "--blend-mask", tmp_path / "mask.png", "--out", tmp_path / "e.png",
                       "--latents-out", tmp_path / "e.safetensors")
    assert code == 0, err
    z = load_file(tmp_path / "e.safetensors")["latents"]
    assert torch.equal(z[1, :, 8:], z[0, :, 8:]) and (z[1, :, :8] - z[0, :, :8]).abs().max() > 1e-2
    for extra, words in ((["--blend-mask", tmp_path / "none.png"], "blend mask"),
                         (["--blend-mask", tmp_path / "black.png"], "is black all over"),
                         (["--blend-mask", tmp_path / "mask.png", "--blend", "cat", "dog"], "--blend words or --blend-mask"),
                         (["--blend-mask", tmp_path / "mask.png", "--out", tmp_path / "mask.png"], "is the --blend-mask input")):
        code, _, err = run(capsys, *base, *extra, *([] if "--out" in extra else ["--out", tmp_path / "x.png"]))
        assert code == 2 and words in err, err
