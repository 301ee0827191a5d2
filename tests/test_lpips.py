"""p2p/eval/lpips.py against the lpips package's distances (tests/golden/lpips.safetensors, written by
scripts/make_golden_lpips.py), by hand, and on files it must refuse.

The maths are checked in float64 against the reference run in float64. The float32 path is checked
against the same numbers at the float32 floor: how far the reference's own float32 run is from its
float64 one on these pairs. Comparing two float32 runs at a fixed relative tolerance would test
rounding, not the maths: the pair of near copies nearly cancels (7.7e-5, ~1e-9 of rounding), and
CPU kernels round differently from machine to machine."""
import copy
import re

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from models import InputError
from p2p.eval.lpips import Lpips
from p2p.viz import as_tensor

from conftest import GOLDEN


@pytest.fixture(scope="module")
def golden():
    tensors = load_file(GOLDEN / "lpips.safetensors")
    weights = {k: v for k, v in tensors.items() if not k.startswith("golden.")}
    pairs = [(tensors[f"golden.{k}.a"].numpy(), tensors[f"golden.{k}.b"].numpy())   # uint8 [H, W, 3]
             for k in range(len(tensors["golden.distances"]))]
    return weights, pairs, tensors["golden.distances64"].tolist(), tensors["golden.distances"].tolist()


@pytest.fixture(scope="module")
def metric(golden):
    return Lpips(golden[0])


def test_the_maths_match_the_lpips_package_in_float64(metric, golden):
    _, pairs, expected, _ = golden
    net = copy.deepcopy(metric.net).double()            # the float32 weights, exactly, in float64
    with torch.no_grad():
        got = [net(2 * as_tensor(a)[None] - 1, 2 * as_tensor(b)[None] - 1).item() for a, b in pairs]
    assert got == pytest.approx(expected, rel=1e-9, abs=0)   # float32 anywhere: 5e-7 to 1e-5 on pairs 1-3


def test_the_float32_path_is_within_the_float32_floor(metric, golden):
    _, pairs, expected, reference32 = golden
    floor = max(abs(r - e) for r, e in zip(reference32, expected))   # the reference's own float32 rounding
    got = [metric.distance(as_tensor(a), as_tensor(b)) for a, b in pairs]
    err = [abs(g - e) for g, e in zip(got, expected)]
    assert max(err) <= 4 * floor, f"float32 errors {err}, the reference's float32 floor {floor:.3g}"
    a, b = pairs[3]                                        # the 70 x 90 pair, as PIL images: the same pixels
    assert metric.distance(Image.fromarray(a), Image.fromarray(b)) == got[3]


def test_identity_and_symmetry(metric):
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(3, 40, 33, generator=g), torch.rand(3, 40, 33, generator=g)
    assert metric.distance(a, a) == 0.0
    assert metric.distance(a, b) == metric.distance(b, a) > 0


def test_the_lin_weights_weigh_the_slices(golden):
    """LPIPS is linear in the lin weights: doubling them all doubles it (exactly: a power of 2 scales
    every rounding with it); zeroing one changes it."""
    weights, pairs = golden[:2]
    a, b = (as_tensor(x) for x in pairs[0])
    plain = Lpips(weights).distance(a, b)
    doubled = Lpips({k: 2 * v if k.startswith("lin") else v for k, v in weights.items()})
    assert doubled.distance(a, b) == 2 * plain
    without = Lpips({**weights, "lin2.weight": torch.zeros_like(weights["lin2.weight"])})
    assert without.distance(a, b) < plain * (1 - 1e-3)


def test_a_missing_file_is_one_note(tmp_path, capsys):
    assert Lpips.load(tmp_path / "lpips-squeeze.safetensors") is None
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("note: LPIPS skipped:") and "convert_lpips.py" in err[0]


@pytest.mark.parametrize("change, named", [
    (lambda w: w.pop("features.12.expand3x3.bias"), "lack features.12.expand3x3.bias"),
    (lambda w: w.update({"lins.0.model.1.weight": w["lin0.weight"].clone()}), "unexpected tensor lins.0.model.1.weight"),
    (lambda w: w.update({"lin3.weight": w["lin3.weight"][:, :200]}), "lin3.weight has shape (1, 200, 1, 1)"),
    (lambda w: w["features.6.squeeze.weight"].view(-1).__setitem__(7, float("nan")), "features.6.squeeze.weight"),
])
def test_bad_files_are_refused(golden, tmp_path, change, named):
    weights = {k: v.clone() for k, v in golden[0].items()}
    change(weights)
    save_file(weights, tmp_path / "bad.safetensors")
    with pytest.raises(InputError, match=re.escape(named)):
        Lpips.load(tmp_path / "bad.safetensors")


def test_a_pickle_is_not_read_and_sizes_are_checked(metric, tmp_path):
    (tmp_path / "squeeze.pth").write_bytes(b"\x80\x04" + b"\x00" * 64)    # a pickle's first bytes
    with pytest.raises(InputError, match="not a readable .safetensors file"):
        Lpips.load(tmp_path / "squeeze.pth")
    with pytest.raises(InputError, match="at least 17x17"):
        metric.distance(torch.rand(3, 16, 64), torch.rand(3, 16, 64))
    with pytest.raises(InputError, match="one size"):
        metric.distance(torch.rand(3, 32, 32), torch.rand(3, 32, 33))
