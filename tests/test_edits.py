"""The edit maths on small hand-made tensors, with the real tokenizer for token positions."""
import pytest
import torch

from models import InputError
from models.attention import Site
from models.text import load_tokenizer
from p2p import edits, sampler
from p2p.blend import AttentionStore, LocalBlend

TOK = load_tokenizer()
CAT, DOG = "a cat riding a bicycle", "a dog riding a bicycle"


def site(cross=True, place="up", level=0, res=(4, 4), name="x"):
    return Site(name, place, level, cross, heads=2, res=res)


def probs(b=2, heads=2, n=16, m=77, seed=0):
    """A CFG batch [uncond b rows, cond b rows] of row-stochastic maps."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2 * b, heads, n, m, generator=g).softmax(-1)


# ---- windows ------------------------------------------------------------------------------

def test_cross_window_has_n_plus_one_rows_like_the_official_table():
    a = edits.cross_alphas(TOK, [CAT, DOG], 50, 0.8)
    assert a.shape == (51, 1, 77)                              # DDIM reads rows 0..49, PLMS all 51
    assert a[:40].eq(1).all() and a[40:].eq(0).all()          # int(0.8 * 51) = 40: steps 0..39
    assert edits.cross_alphas(TOK, [CAT, DOG], 50, 1.0).eq(1).all()   # the whole window: PLMS's call 50 too
    a = edits.cross_alphas(TOK, [CAT, DOG], 50, (0.2, 0.6))
    assert a[:, 0, 0].nonzero().flatten().tolist() == list(range(10, 30))   # int(.2*51)=10, int(.6*51)=30


def test_per_word_windows_change_only_that_words_columns():
    a = edits.cross_alphas(TOK, [CAT, DOG, "a horse riding a bicycle"], 10, {"default": 0.8, "dog": (0.0, 0.4)})
    # 11 rows: default covers steps 0..7 (int(.8*11)=8), "dog" (token 2 of target 0) steps 0..3 (int(.4*11)=4)
    assert a[:, 0, 2].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert a[:, 0, 3].tolist() == [1] * 8 + [0, 0, 0]
    assert a[:, 1, 2].tolist() == [1] * 8 + [0, 0, 0]           # "dog" is not in target 1
    with pytest.raises(InputError, match="'zebra' of a step window is in no target"):
        edits.cross_alphas(TOK, [CAT, DOG], 10, {"default": 0.8, "zebra": 0.3})


def test_self_window():
    assert edits.self_window(50, 0.4) == (0, 20)
    assert edits.self_window(10, (0.2, 0.5)) == (2, 5)


# ---- cross edits ----------------------------------------------------------------------------

def test_replace_is_the_mapper_product():
    prompts = ["a squirrel eating a burger", "a squirrel eating a lasagna"]
    replace = edits.Replace(TOK, prompts)
    src, tgt = probs(1)[1], probs(1, seed=1)[1:2]
    e = replace(src, tgt)
    m = replace.mappers[0]
    for j in (0, 4, 5, 6, 7, 30):
        assert torch.allclose(e[0, ..., j], (src * m[:, j]).sum(-1), atol=1e-6)


def test_refine_gathers_aligned_columns_and_keeps_new_tokens():
    prompts = ["a photo of a house on a mountain", "a photo of a house on a mountain at winter"]
    refine = edits.Refine(TOK, prompts)
    src, tgt = probs(1)[1], probs(1, seed=1)[1:2]
    e = refine(src, tgt)
    assert torch.equal(e[0, ..., 3], src[..., 3])                 # "of" -> "of"
    assert torch.equal(e[0, ..., 9], tgt[0, ..., 9])              # "at" has no source partner
    assert torch.equal(e[0, ..., 10], tgt[0, ..., 10])            # "winter" neither


def test_reweight_scales_source_maps_or_the_edit_below():
    prompts = [CAT, DOG]
    src, tgt = probs(1)[1], probs(1, seed=1)[1:2]
    alone = edits.Reweight(TOK, [CAT, CAT], {"cat": -0.5})
    e = alone(src, tgt)
    assert torch.equal(e[0, ..., 2], -0.5 * src[..., 2]) and torch.equal(e[0, ..., 3], src[..., 3])
    stacked = edits.Reweight(TOK, prompts, {"dog": 3.0}, prev=edits.Replace(TOK, prompts))
    e = stacked(src, tgt)
    assert torch.allclose(e[0, ..., 2], 3.0 * src[..., 2]) and torch.equal(e[0, ..., 5], src[..., 5])
    with pytest.raises(InputError, match="'cat' is in no target"):
        edits.Reweight(TOK, prompts, {"cat": 2.0})


# ---- the callback ------------------------------------------------------------------------

def make_edit(**kw):
    prompts = kw.pop("prompts", [CAT, DOG])
    kw.setdefault("cross", edits.Reweight(TOK, prompts, {"dog": 2.0}))
    return edits.PromptToPrompt(TOK, prompts, steps=10, **kw)


def test_cross_edit_mixes_inside_the_window_and_leaves_the_unconditional_half():
    edit, p = make_edit(), probs()
    before = p.clone()
    out = edit(p, site())
    assert torch.equal(p, before)                                  # the caller's tensor is not touched
    assert torch.equal(out[:3], p[:3])                             # uncond rows and the source row
    expected = p[2].clone()
    expected[..., 2] *= 2.0                                        # E = 2 * source on "dog", source elsewhere
    assert torch.allclose(out[3], expected)                        # alpha = 1 at step 0
    edit.step = 8                                                  # outside int(.8 * 11) = 8
    assert not edit.wants(site())


def test_self_injection_copies_the_source_only_at_small_maps_and_early_steps():
    edit, p = make_edit(), probs(n=16, m=16)
    assert edit.wants(site(cross=False, res=(4, 4)))
    out = edit(p, site(cross=False))
    assert torch.equal(out[3], p[2]) and torch.equal(out[:3], p[:3])
    assert not edit.wants(site(cross=False, res=(32, 32)))          # 1024 keys > 256
    edit.step = 4                                                   # self window is [0, int(.4 * 10)) = [0, 4)
    assert not edit.wants(site(cross=False))


def test_edit_uncond_option_edits_both_halves():
    edit, p = make_edit(edit_uncond=True), probs(n=16, m=16)
    out = edit(p, site(cross=False))
    assert torch.equal(out[1], p[0]) and torch.equal(out[3], p[2])


@pytest.mark.parametrize("n", [1, 16])   # a 1x1 map: where CPU SDPA rounds a row by its place in the batch
def test_a_target_equal_to_the_source_gets_its_output_bit_for_bit(n):
    """By construction, whatever the kernels: PromptToPrompt.fused computes the source row and every
    target's share of the source's attention in one SDPA call, so equal rows in give equal rows out."""
    prompts = [CAT, CAT, CAT]
    edit = edits.PromptToPrompt(TOK, prompts, 10, edits.Replace(TOK, prompts), edit_uncond=True)
    g = torch.Generator().manual_seed(0)
    for s, m in ((site(res=(n, 1)), 77), (site(cross=False, res=(n, 1)), n)):
        assert edit.edits(s)
        q, k, v = (torch.randn(2, 1, 2, length, 8, generator=g).expand(-1, 3, -1, -1, -1).reshape(6, 2, length, 8)
                   for length in (n, m, m))        # [uncond, cond] x 3 equal prompts, 2 heads, d = 8
        out = edit.fused(q, k, v, s)
        assert all(torch.equal(out[h], out[h + j]) for h in (0, 3) for j in (1, 2)), s


def test_site_predicates_keep_other_layers_fused():
    up4 = lambda s: edits.picks((("up", 4),), s)
    edit = make_edit(cross_sites=up4, self_sites=up4)
    assert edit.wants(site(place="up", res=(4, 4))) and edit.wants(site(cross=False, place="up", res=(4, 4)))
    assert not edit.wants(site(place="down", res=(4, 4)))
    assert not edit.wants(site(place="up", res=(8, 8)))
    edit = make_edit(cross_sites=lambda s: False)
    assert not edit.wants(site(cross=True)) and edit.wants(site(cross=False))


def test_store_keeps_its_layers_and_steps():
    store = AttentionStore((("up", "any"),), res=4, steps=(2, 5))
    assert not store.keeps(site(), 1) and store.keeps(site(), 2) and not store.keeps(site(), 5)
    assert not store.keeps(site(place="down"), 2) and not store.keeps(site(res=(8, 8)), 2)
    assert not store.keeps(site(cross=False), 2) and AttentionStore(self_attention=True).keeps(site(cross=False), 0)


def test_store_averages_the_edited_maps_over_steps():
    store = AttentionStore()
    edit, p = make_edit(store=store), probs()
    out0 = edit(p, site(name="a"))
    edit.step = 9                                                  # outside the window: stored as is
    edit(p, site(name="a"))
    expected = (out0[2:].mean(1) + p[2:].mean(1)) / 2
    assert torch.allclose(store.maps(4), expected.reshape(2, 4, 4, 77))


def test_local_blend_by_hand():
    prompts = [CAT, DOG]
    blend = LocalBlend(TOK, prompts, [["cat"], ["dog"]], threshold=0.3, res=4)
    store = AttentionStore()
    maps = torch.zeros(2, 16, 77)
    maps[0, 0, 2] = 1.0                        # source "cat" attends pixel (0, 0)
    maps[1, 15, 2] = 1.0                       # target "dog" attends pixel (3, 3)
    maps[1, 5, 2] = 0.2                        # below 0.3 of the max: not in the mask
    s = site(res=(4, 4), name="up.x")
    store.add(maps[:, None].expand(2, 2, 16, 77), s, 0)
    x = torch.stack([torch.zeros(4, 4, 4), torch.ones(4, 4, 4)])
    out = blend(x, store, 0)
    mask = torch.zeros(4, 4)
    mask[:2, :2] = 1                            # 3x3 max-pool around (0, 0)
    mask[2:, 2:] = 1                            # and around (3, 3): the union
    assert torch.equal(out[0], x[0]) and torch.equal(out[1], mask.expand(4, 4, 4))
    assert torch.equal(LocalBlend(TOK, prompts, [["cat"], ["dog"]], res=4, start=1)(x, store, 0), x)


def test_local_blend_checks_its_words():
    with pytest.raises(InputError, match="one word list per prompt"):
        LocalBlend(TOK, [CAT, DOG], [["cat"]])
    with pytest.raises(InputError, match="'dog' is not in the prompt"):
        LocalBlend(TOK, [CAT, DOG], [["dog"], ["dog"]])


# ---- on the tiny model ------------------------------------------------------------------

def test_identity_edit_reproduces_the_source(tiny):
    """End to end the rows are as close as batch position alone leaves a plain batch of two equal prompts:
    bit for bit where that batch's rows are (1 or 2 threads here), else rounding that sampling grows (at 3
    and 4 threads GEMMs round rows by place: 6.3e-5 and 4.1e-5 here, the edit's rows 0.7x that)."""
    prompts = [CAT, CAT]
    run = lambda p, e=None: sampler.generate(tiny, p, steps=4, height=64, width=64, edit=e, progress=False)
    z = run(prompts, edits.PromptToPrompt(TOK, prompts, 4, edits.Replace(TOK, prompts)))
    pair, plain = run(prompts), run([CAT])
    floor = (pair[0] - pair[1]).abs().max()
    assert (z[0] - z[1]).abs().max() <= 2 * floor, f"the edit's rows differ by {(z[0] - z[1]).abs().max():.3g}, " \
                                                    f"a plain batch's by {floor:.3g}"
    assert torch.allclose(z[0], plain[0], atol=1e-4 * plain.abs().max())


def test_an_edit_limited_to_up_layers_leaves_down_and_mid_untouched(tiny):
    prompts = [CAT, DOG]
    seen = {}

    class Spy(edits.PromptToPrompt):
        def __call__(self, p, s):
            out = super().__call__(p, s)
            seen.setdefault(s.place, []).append(torch.equal(out, p))
            return out

    up = lambda s: s.place == "up"
    edit = Spy(TOK, prompts, 2, edits.Reweight(TOK, prompts, {"dog": 5.0}), store=AttentionStore(),
               cross_sites=up, self_sites=up)
    sampler.generate(tiny, prompts, steps=2, height=64, width=64, edit=edit, progress=False)
    assert all(seen["down"]) and all(seen["mid"]) and not all(seen["up"])


def test_local_blend_subtract_words_cut_their_unpooled_mask_out():
    prompts = [CAT, DOG]
    blend = LocalBlend(TOK, prompts, [["cat"], ["dog"]], threshold=0.3, res=4,
                       subtract=[["bicycle"], ["bicycle"]])
    store = AttentionStore()
    maps = torch.zeros(2, 16, 77)
    maps[0, 0, 2] = maps[1, 15, 2] = 1.0       # cat at (0, 0), dog at (3, 3)
    maps[0, 0, 5] = 1.0                        # the source's "bicycle" at (0, 0) only, not pooled
    maps[1, 10, 5] = 1.0                       # the target's "bicycle" at (2, 2)
    store.add(maps[:, None], site(res=(4, 4), name="down.x", place="down"), 0)
    x = torch.stack([torch.zeros(4, 4, 4), torch.ones(4, 4, 4)])
    mask = torch.zeros(4, 4)
    mask[:2, :2] = mask[2:, 2:] = 1
    mask[0, 0] = mask[2, 2] = 0                # both prompts' subtract masks are cut from the target's
    assert torch.equal(blend(x, store, 0)[1], mask.expand(4, 4, 4))


def test_self_attention_components_find_a_planted_pattern():
    from p2p import viz
    pattern = torch.zeros(4, 4)
    pattern[:, :2] = 1.0                                   # left half vs right half
    g = torch.Generator().manual_seed(0)
    weights = torch.rand(16, 1, generator=g) + 0.5
    maps = weights * pattern.flatten()[None] + 1e-4 * torch.rand(16, 16, generator=g)   # ~rank 1 after centring
    store = AttentionStore(self_attention=True)
    store.add(maps[None, None], site(cross=False, res=(4, 4), name="up.self"), 0)
    import numpy as np
    first = torch.from_numpy(np.asarray(viz.self_components(store, 4, 1)[0].convert("L").resize((4, 4)),
                                        dtype=np.float32))
    c = torch.corrcoef(torch.stack([first.flatten(), pattern.flatten()]))[0, 1]
    assert c.abs() > 0.99
