"""`p2p generate/edit --sampler plms` against PLMS goldens from an independent implementation.

tests/golden/plms.safetensors was written once by scripts/make_golden_plms.py: diffusers'
PNDMScheduler with the SD v1.4 config, in the official notebook's loop, with the reference
controller of scripts/make_golden_p2p.py counting UNet calls (11 for 10 steps) and the authors'
replace mapper where a case says "official"; see its docstring. Every case goes through the
command line here, as a user would run it, and its --latents-out must match within 1e-3.
"""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from p2p.cli import main

from conftest import GOLDEN
from test_golden import fingerprint

FILE = GOLDEN / "plms.safetensors"
TOL = 1e-3
REGENERATE = "regenerate the goldens with: pip install diffusers==0.42.1 && python scripts/make_golden_plms.py"

with safe_open(str(FILE), "pt") as _f:
    META = {k: json.loads(v) if v[:1] in "[{" else v for k, v in _f.metadata().items()}
    GOLD = {k: _f.get_tensor(k) for k in _f.keys()}


def window(w) -> str:
    return f"{w[0]}:{w[1]}" if isinstance(w, list) else str(w)


def argv(case: dict, weights, out) -> list[str]:
    """The command line of a golden case (CASES in scripts/make_golden_plms.py)."""
    s, prompts, size = META["sampling"], case["prompts"], case["size"]
    common = ["--weights", weights, "--sampler", "plms", "--steps", s["steps"], "--seed", s["seed"],
              "--guidance", s["guidance"], "--height", size, "--width", size,
              "--out", out / "x.png", "--latents-out", out / "x.safetensors"]
    if case["cross"] == "none":
        return ["generate", *[a for p in prompts for a in ("--prompt", p)], *common]
    windows = case["cross_steps"] if isinstance(case["cross_steps"], dict) else {"default": case["cross_steps"]}
    a = ["edit", "--source", prompts[0], *[x for p in prompts[1:] for x in ("--target", p)],
         "--mode", case["cross"] or "reweight", "--cross-steps", window(windows["default"]),
         "--self-steps", window(case["self_steps"]), "--replace-mapper", case["mapper"], *common]
    a += ["--word-steps", *[f"{w}={window(b)}" for w, b in windows.items() if w != "default"]] if len(windows) > 1 else []
    a += ["--reweight", *[f"{w}={c}" for w, c in case["scales"].items()]] if case["scales"] else []
    if case["blend"]:
        a += ["--blend", *[",".join(ws) for ws in case["blend"]], "--blend-threshold", case["threshold"],
              "--blend-start", case["blend_start"], "--blend-res", META["settings"]["blend_res"]]
    return a


def test_the_goldens_were_made_from_these_tiny_weights(tiny_folder):
    if not torch.allclose(fingerprint(tiny_folder), GOLD["fingerprint"], rtol=1e-9, atol=0):
        pytest.fail(f"scripts/make_tiny.py no longer writes the weights the goldens were made from; {REGENERATE}",
                    pytrace=False)


@pytest.mark.parametrize("name", list(META["cases"]))
def test_plms_command_matches_golden(name, tiny_file, tmp_path, capsys):
    case = META["cases"][name]
    code = main([str(x) for x in argv(case, tiny_file, tmp_path)])
    assert code == 0, capsys.readouterr().err
    ours, ref = load_file(tmp_path / "x.safetensors")["latents"], GOLD[name]
    assert ours.shape == ref.shape
    err = (ours.double() - ref.double()).abs().amax(dim=(1, 2, 3))
    assert err.max() <= TOL, f"{name}: max abs error per prompt {[f'{e:.3g}' for e in err.tolist()]} > {TOL}; {case}"


def test_plms_and_ddim_differ_and_the_mappers_differ():
    """The goldens themselves: each setting the cases vary changes the latents."""
    assert (GOLD["replace_blend"] - GOLD["replace_blend_official"]).abs().max() > 10 * TOL
    assert (GOLD["replace_blend"] - GOLD["replace_blend_start"]).abs().max() > 10 * TOL
    ddim = load_file(GOLDEN / "p2p.safetensors")["replace"]    # the same case under DDIM
    assert (GOLD["replace"] - ddim).abs().max() > 10 * TOL
