"""Attention-map pictures on hand-built stores: non-square maps keep their shape, wide grids wrap."""

import numpy as np
import pytest
import torch
from PIL import Image

from models.attention import Site
from models.text import load_tokenizer
from p2p import viz
from p2p.blend import AttentionStore
from p2p.viz import GAP, labelled_row

H, W = 2, 3  # a landscape feature map: short side 2, the `res` that picks it
HEADS, M = 2, 77


def _site(name, is_cross, place="up"):
    return Site(name=name, place=place, level=1, is_cross=is_cross, heads=HEADS, res=(H, W))


def _cross_store() -> AttentionStore:
    """Two cross sites whose maps for token 1 ("a") are hot in the top-right pixel only."""
    store = AttentionStore()
    probs = torch.full((1, HEADS, H * W, M), 0.01)       # [b, heads, n, m], n = h * w row by row
    probs[:, :, W - 1, 1] = 1.0                           # pixel (row 0, column W-1)
    for name, place in [("down_blocks.1.attentions.0.transformer_blocks.0.attn2", "down"),
                        ("up_blocks.2.attentions.0.transformer_blocks.0.attn2", "up")]:
        store.add(probs, _site(name, True, place), step=0)
    return store


def test_token_maps_are_h_by_w():
    maps = viz.token_maps(_cross_store(), res=min(H, W))
    assert maps.shape == (1, H, W, M)
    hot = maps[0, :, :, 1]
    assert hot[0, W - 1] == pytest.approx(1.0) and hot.sum() == pytest.approx(1.0 + 0.01 * (H * W - 1))


def test_heat_keeps_the_image_shape():
    attention = np.zeros((H, W))
    attention[0, W - 1] = 1.0
    tile = viz.heat(Image.new("RGB", (48, 32), "grey"), attention)
    assert tile.size == (160, 107)
    red = np.asarray(tile)[:, :, 0].astype(int)
    assert red[:20, -20:].mean() > red[-20:, :20].mean() + 50  # hot where the map is: top right
    assert viz.heat(Image.new("RGB", (32, 48), "grey"), attention.T).size == (107, 160)


def test_token_maps_grid_on_a_non_square_image():
    tokenizer = load_tokenizer()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8))
    grid = viz.token_maps_grid([image], ["a cat"], _cross_store(), tokenizer, res=min(H, W))
    assert grid.width == 3 * 160 + 2 * GAP  # the image, "a", "cat"
    assert np.array_equal(np.asarray(grid.crop((0, 0, 160, 107))),
                          np.asarray(image.resize((160, 107), Image.BILINEAR)))
    below = np.asarray(grid.crop((0, 107, 160, 107 + GAP)))
    assert (below == 255).all()  # white under the 107-pixel tile, not a squashed square one
    a_tile = np.asarray(grid.crop((160 + GAP, 0, 2 * 160 + GAP, 107)))[:, :, 0].astype(int)
    assert a_tile[:20, -20:].mean() > a_tile[-20:, :20].mean() + 50


def test_self_components_keep_the_map_shape():
    store = AttentionStore()
    probs = torch.softmax(torch.randn(1, HEADS, H * W, H * W, generator=torch.Generator().manual_seed(0)), -1)
    store.add(probs, _site("up_blocks.2.attentions.0.transformer_blocks.0.attn1", False), step=0)
    parts = viz.self_components(store, min(H, W), 3)
    assert [p.size for p in parts] == [(160, 107)] * 3


def test_components_grid_rows_of_eight():
    parts = [Image.new("RGB", (160, 107), (i * 20, 0, 0)) for i in range(10)]
    grid = viz.components_grid(parts)
    first = labelled_row(parts[:8], [f"self-attention component {i + 1}" for i in range(8)])
    assert grid.width == 8 * 160 + 7 * GAP == first.width
    assert grid.height == 2 * first.height
    assert np.array_equal(np.asarray(grid.crop((0, 0, grid.width, first.height))), np.asarray(first))
    second_row = np.asarray(grid.crop((0, first.height, 160, first.height + 107)))
    assert (second_row == np.asarray(parts[8])).all()  # the ninth starts the second row
    assert viz.components_grid(parts[:3]).width == 3 * 160 + 2 * GAP
