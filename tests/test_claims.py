"""scripts/claims.py: its measures on hand-made cases, and its claims run end to end (on the tiny
random model here: the trained baby does not ship yet, so the figures themselves are not asserted)."""
import math

import numpy as np
import pytest
from PIL import Image

from p2p.eval import world
from p2p.experiment import run
from tests.conftest import script

claims = script("claims")
S = claims.Settings(steps=2)


def test_the_measures_on_hand_made_cases():
    a = np.zeros((4, 4), bool)
    a[:2, :2] = True
    b = np.zeros((4, 4), bool)
    b[:2, :3] = True
    assert claims.iou(a, b) == 4 / 6 and math.isnan(claims.iou(a & ~a, b & ~b))
    assert claims.grow(a, 1).sum() == 9 and claims.grow(a, 2).sum() == 16
    black, grey = Image.new("RGB", (4, 4), (0, 0, 0)), Image.new("RGB", (4, 4), (51, 51, 51))   # 0.2 apart
    assert claims.psnr(black, grey) == pytest.approx(-10 * math.log10(0.2 ** 2))
    assert claims.psnr(black, grey, ~a) == claims.psnr(black, grey) and claims.psnr(black, black) == 100
    assert claims.spread([True, False, True, None]) == {"mean": 2 / 3, "sd": pytest.approx(0.57735, abs=1e-5), "n": 3}


def test_its_scenes_are_the_worlds_unseen_ones():
    two = list(claims.scenes(5, objects=2))
    assert all(len(s.objects) == 2 for _, s in two)
    assert [s for _, s in two] == [world.scene(claims.DATA_SEED, i, 64) for i, _ in two]
    assert two[0][0] == min(i for i in range(100) if len(world.scene(claims.DATA_SEED, i, 64).objects) == 2)


@pytest.fixture(scope="module")
def sd(tiny_folder):
    return run.load(tiny_folder, "cpu")


def test_every_claim_runs_and_is_tabled(sd):
    r = claims.measure(sd, 2, S)
    # fidelity counts every object of the first two scenes, and their named backgrounds
    scenes = [s for _, s in claims.scenes(2)]
    assert r["fidelity"]["objects"]["n"] == sum(len(s.objects) for s in scenes)
    assert r["fidelity"]["backgrounds"]["n"] == sum(s.background_word is not None for s in scenes)
    assert set(r["photos"]) == {"null-text", "negative-prompt", "ddim", "direct"}
    assert all(d["psnr"]["n"] == 2 for d in r["photos"].values())   # max(2, seeds // 4) photos
    assert r["reweight"]["rising"]["n"] == 2
    table = claims.table(r)
    for words in ("text fidelity", "maps localise words", "word swap keeps layout", "re-weighting",
                  "photos: direct", "reconstruction PSNR"):
        assert words in table
