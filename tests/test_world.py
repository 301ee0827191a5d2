"""The world of captioned shapes: determinism, captions that match the pictures, exact masks, edits
that change one word and one attribute, and a PIE-Bench-format set that `p2p.eval.pie` reads."""
import json
from dataclasses import fields

import numpy as np
import pytest
import torch
from PIL import Image

from models import InputError
from models.text import load_tokenizer
from p2p.eval import pie, world

from conftest import script

SCENES = [world.scene(0, i) for i in range(120)]
ROLE = {**dict.fromkeys(world.COLOURS + world.BACKGROUNDS, "C"), **dict.fromkeys(world.SHAPES, "S"),
        **dict.fromkeys(world.SIZES, "Z")}            # a caption's form: its words by role


def erode(mask: np.ndarray, times: int = 2) -> np.ndarray:
    """The mask less `times` rings of pixels: away from the antialiased edges (a triangle's tip
    partly covers a few pixels in a row, none of them by more than half)."""
    for _ in range(times):
        inner = mask.copy()
        inner[1:] &= mask[:-1]
        inner[:-1] &= mask[1:]
        inner[:, 1:] &= mask[:, :-1]
        inner[:, :-1] &= mask[:, 1:]
        mask = inner
    return mask


def test_every_vocabulary_word_is_one_clip_token():
    tok = load_tokenizer()
    words = {*world.COLOURS, *world.BACKGROUNDS, *world.SHAPES, *world.SIZES, "a", "and", "on", "background"}
    assert {w for s in SCENES for w in s.words} <= words
    for word in words:
        assert len(tok(word).input_ids) == 3, word          # start, the word, end
    # "a" before every attribute: "an" would make swapping in a vowel word change two words
    assert not any(w[0] in "aeiou" for w in {*world.COLOURS, *world.BACKGROUNDS, *world.SHAPES, *world.SIZES})


def test_item_i_of_a_seed_is_the_same_scene_and_image_every_time():
    a, b, c = world.scene(7, 3), world.scene(7, 3), world.scene(7, 4)
    assert a == b and a != c and world.scene(8, 3) != a
    assert np.array_equal(np.asarray(world.render(a)[0]), np.asarray(world.render(b)[0]))
    assert not np.array_equal(np.asarray(world.render(a)[0]), np.asarray(world.render(c)[0]))
    big = world.scene(7, 3, size=512)      # another size: the same caption and layout
    assert (big.caption, big.objects) == (a.caption, a.objects) and world.render(big)[0].size == (512, 512)


def test_captions_take_every_form_and_name_what_is_drawn():
    forms = set()
    for s in SCENES:
        assert s.words == s.caption.split(" ")
        forms.add(" ".join(ROLE.get(w, w) for w in s.words))
        image, masks = world.render(s)
        for t, mask in zip(s.objects, masks):
            assert s.words[t.colour_word] == t.colour == world.read_colour(image, mask)
            assert s.words[t.shape_word] == t.shape
            assert t.size_word is None or s.words[t.size_word] == t.size
            assert t.radius == world.SIZES[t.size]
        assert world.read_colour(image, ~np.logical_or.reduce(masks)) == s.background
        assert s.background_word is None or s.words[s.background_word] == s.background
    assert {"a C S", "a C S and a C S", "a Z C S and a Z C S on a C background"} <= forms
    assert len(forms) == 8                  # 1 or 2 objects, sizes named or not, background named or not


def test_masks_are_exact_apart_and_small_is_smaller_than_big():
    areas = {"small": [], "big": []}
    for s in SCENES:
        image, masks = world.render(s)
        pixels = np.asarray(image).astype(int)
        for t, mask in zip(s.objects, masks):
            areas[t.size].append(mask.sum())
            assert (pixels[erode(mask)] == world.PALETTE[t.colour]).all()
            # an edge pixel covered more than half is nearer the object's colour than the background's
            near = np.abs(pixels[mask] - world.PALETTE[t.colour]).sum(-1)
            assert (near <= np.abs(pixels[mask] - world.PALETTE[s.background]).sum(-1)).all()
        if len(masks) == 2:
            assert not (masks[0] & masks[1]).any()
        outside = erode(~np.logical_or.reduce(masks))
        assert (pixels[outside] == world.PALETTE[s.background]).all()
    assert max(areas["small"]) < min(areas["big"])


def test_read_colour_reads_back_every_palette_colour():
    read = set()
    for s in SCENES:
        image, masks = world.render(s)
        read |= {world.read_colour(image, m) for m in masks} | {world.read_colour(image, ~np.logical_or.reduce(masks))}
    assert read == set(world.PALETTE)


@pytest.mark.parametrize("kind,field", [("colour", "colour"), ("shape", "shape"), ("size", "size"),
                                        ("background", "background")])
def test_an_edit_changes_one_word_and_that_attribute_only(kind, field):
    rng, done = np.random.default_rng(0), 0
    for s in SCENES:
        try:
            caption, target, old, new = world.edit(s, kind, rng)
        except InputError:
            assert kind in ("size", "background")
            continue
        done += 1
        assert caption == target.caption and old != new
        changed = [i for i, (a, b) in enumerate(zip(s.words, target.words)) if a != b]
        assert len(target.words) == len(s.words) and len(changed) == 1
        assert (s.words[changed[0]], target.words[changed[0]]) == (old, new)
        if kind == "background":
            assert target.objects == s.objects and changed == [s.background_word]
            continue
        assert target.background == s.background
        diff = [(a, b) for a, b in zip(s.objects, target.objects) if a != b]
        assert len(diff) == 1
        a, b = diff[0]
        assert {f.name for f in fields(a) if getattr(a, f.name) != getattr(b, f.name)} == \
            ({"size", "radius"} if kind == "size" else {field})
        assert (getattr(a, field), getattr(b, field)) == (old, new)
        assert world.fits(target.objects)
    assert done >= 20
    if kind in ("size", "background"):
        with pytest.raises(InputError, match="names"):
            world.edit(next(s for s in SCENES if s.background_word is None and s.objects[0].size_word is None),
                       kind, rng)


def test_write_pie_is_read_by_pie_with_exact_masks_and_the_changed_words(tmp_path):
    folder = tmp_path / "set"
    written = world.write_pie(folder, 8, seed=3, size=64)
    assert len(written) == 9 and all(p.is_file() for p in written)
    items, bad = pie.read(folder)
    assert bad == {} and len(items) == 8
    mapping = json.loads((folder / "mapping_file.json").read_text())
    assert sorted(i.type for i in items) == [1, 1, 5, 5, 6, 6, 8, 8]
    for item in items:
        w = mapping[item.id]["world"]
        source, caption, target, old, new = world.benchmark_edit(3, w["index"], w["kind"])
        assert (item.source, item.target, item.blended) == (source.caption, caption, (old, new))
        assert f"[{old}]" in mapping[item.id]["original_prompt"] and f"[{new}]" in mapping[item.id]["editing_prompt"]
        with Image.open(item.image) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(world.render(source)[0]))
        _, before = world.render(source, 512)
        _, after = world.render(target, 512)
        if w["kind"] == "background":
            union = ~np.logical_or.reduce(before)
        else:
            i = next(i for i, t in enumerate(source.objects) if old in [source.words[j] for j in t.word_indices])
            union = before[i] | after[i]
        assert torch.equal(pie.decode_mask(item.mask, border=False), torch.from_numpy(union))
    with pytest.raises(InputError, match="not an empty folder"):
        world.write_pie(folder, 1, seed=3)


def test_the_script_writes_a_set_and_refuses_in_one_line(tmp_path, capsys):
    main = script("world_pie").main
    assert main(["--out", str(tmp_path / "s"), "--count", "2", "--seed", "0", "--size", "32"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["--out", str(tmp_path / "s"), "--count", "2", "--seed", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("world_pie: error:") and err.count("\n") == 1


def test_colour_masks_find_each_object_by_its_colour():
    """Inside every object its colour's mask is its mask, and that colour is nowhere away from the
    objects: what may differ is the antialiased rim."""
    def grow(m):
        out = m.copy()
        out[1:] |= m[:-1]
        out[:-1] |= m[1:]
        out[:, 1:] |= m[:, :-1]
        out[:, :-1] |= m[:, 1:]
        return out

    for index in range(20):
        s = world.scene(3, index, 64)
        image, masks = world.render(s)
        found = world.colour_masks(image)
        assert sum(m.astype(int) for m in found.values()).max() == 1      # each pixel one colour
        near = grow(grow(np.logical_or.reduce(masks)))   # (a triangle's tip shades two pixels out)
        assert found[s.background][~near].all()
        for thing, mask in zip(s.objects, masks):
            assert found[thing.colour][~grow(~mask)].all()                 # the object less its rim
            assert not (found[thing.colour] & ~near).any()
