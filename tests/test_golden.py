"""Our networks, schedule and sampler against goldens from an independent implementation.

tests/golden/tiny.safetensors was written once by scripts/make_golden.py (diffusers and
transformers on the tiny checkpoint of scripts/make_tiny.py; see its docstring). The reference
library is not imported here. Tolerances: one network call within 1e-4 * max(1, max|golden|);
the 10-step end-to-end latents within 1e-3 absolute; the schedule within 2e-6.
"""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from models import ddim
from p2p.cli import main
from p2p.sampler import generate, guidance_batch, initial_noise

from conftest import GOLDEN, script

FILE = GOLDEN / "tiny.safetensors"
ODD_FILE = GOLDEN / "odd_size.safetensors"   # scripts/make_golden.py --odd-size
make_tiny = script("make_tiny")
fingerprint, COMPONENTS = make_tiny.fingerprint, make_tiny.COMPONENTS
REGENERATE = ("regenerate the goldens with: pip install diffusers==0.42.1 && python scripts/make_golden.py "
              "(and again with --odd-size)")


def read_golden(file, tiny_folder) -> dict:
    """The golden tensors, only once the tiny weights are known to be the ones they were made from."""
    with safe_open(str(file), "pt") as f:
        g = {k: f.get_tensor(k) for k in f.keys()}
        g["meta"] = {k: json.loads(v) if v[:1] in "[{" else v for k, v in f.metadata().items()}
    drifted = [name for name, ours, ref in zip(COMPONENTS, fingerprint(tiny_folder), g["fingerprint"])
               if not torch.allclose(ours, ref, rtol=1e-9, atol=0)]
    if drifted:
        pytest.fail(f"scripts/make_tiny.py no longer writes the weights the goldens were made from "
                    f"({', '.join(drifted)} changed): the networks were not compared; {REGENERATE}", pytrace=False)
    return g


@pytest.fixture(scope="module")
def golden(tiny_folder):
    return read_golden(FILE, tiny_folder)


@pytest.fixture(scope="module")
def odd_golden(tiny_folder):
    return read_golden(ODD_FILE, tiny_folder)


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str, atol: float | None = None):
    """Max abs error within 1e-4 * max(1, max|ref|), or within `atol` when given."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)}, golden {tuple(ref.shape)}"
    err = (ours.double() - ref.double()).abs().max().item()
    tol = atol if atol is not None else 1e-4 * max(1.0, ref.abs().max().item())
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g} (golden max |x| {ref.abs().max().item():.3g})"


def test_tiny_weights_are_those_the_goldens_were_made_from(golden, tiny_folder):
    assert torch.allclose(fingerprint(tiny_folder), golden["fingerprint"], rtol=1e-9, atol=0), REGENERATE


def test_text_encoder(golden, tiny):
    prompts = golden["meta"]["prompts"]
    assert torch.equal(tiny.text.tokenize(prompts), golden["text.ids"])
    assert_close(tiny.text.encode(prompts), golden["text.hidden"], "text hidden states")


@torch.no_grad()
def test_unet(golden, tiny):
    context = golden["text.hidden"][golden["unet.context_rows"]]
    for t in golden["meta"]["unet_timesteps"]:
        assert_close(tiny.unet(golden["unet.x"], t, context), golden[f"unet.eps.{t}"], f"UNet eps at t={t}")


@torch.no_grad()
def test_vae_decoder(golden, tiny):
    assert_close(tiny.vae.decode(golden["vae.z"]), golden["vae.decoded"], "VAE decoder")


@torch.no_grad()
def test_vae_encoder(golden, tiny):
    mean, logvar = tiny.vae.posterior(golden["vae.image_u8"].float() / 127.5 - 1)
    assert_close(mean, golden["vae.mean"], "VAE posterior mean")
    assert_close(logvar, golden["vae.logvar"], "VAE posterior log-variance")


def test_schedule(golden):
    # ours is the LDM buffer (cumprod in float64, see test_ddim.py); the reference takes the
    # cumprod in float32, which drifts by ~5e-7 over 1000 factors
    atol = 2e-6
    assert_close(ddim.alphas_cumprod(), golden["ddim.alphas_cumprod"], "alphas_cumprod", atol)
    for steps in (5, 50):
        t, alpha_t, alpha_prev = zip(*ddim.schedule(steps))
        assert list(t) == golden[f"ddim.{steps}.timesteps"].tolist()
        assert_close(torch.tensor(alpha_t), golden[f"ddim.{steps}.alpha_t"], f"alpha_t, {steps} steps", atol)
        assert_close(torch.tensor(alpha_prev), golden[f"ddim.{steps}.alpha_prev"], f"alpha_prev, {steps} steps", atol)


@torch.no_grad()
def test_ddim_trajectory_step_by_step(golden, tiny):
    case, guidance = golden["meta"]["trajectory"], float(golden["meta"]["guidance"])
    context = guidance_batch(tiny.text.encode([""]), tiny.text.encode([case["prompt"]]))

    def denoise(x, t, i):
        eps_uncond, eps_cond = tiny.unet(torch.cat([x, x]), t, context).chunk(2)
        return eps_uncond + guidance * (eps_cond - eps_uncond)

    trajectory = []
    ddim.sample(denoise, golden["x_T.0"], ddim.schedule(case["steps"]),
                after_step=lambda i, x: trajectory.append(x) or x)
    for i, (ours, ref) in enumerate(zip(trajectory, golden["trajectory"], strict=True)):
        assert_close(ours, ref, f"latents after DDIM step {i}")


def test_initial_noise_is_the_goldens_x_T(golden):
    size = int(golden["meta"]["size"])
    assert torch.equal(initial_noise(0, size, size), golden["x_T.0"])
    assert torch.equal(initial_noise(3, size, size), golden["x_T.3"])


@pytest.mark.parametrize("key", ["e2e", "e2e_negative"])
def test_generate_end_to_end(golden, tiny, key):
    case, size = golden["meta"][key], int(golden["meta"]["size"])
    latents = generate(tiny, case["prompts"], seed=case["seed"], steps=case["steps"],
                       guidance=float(golden["meta"]["guidance"]), height=size, width=size,
                       negative=case.get("negative", ""), progress=False)
    assert_close(latents, golden[key], f"{key} latents after {case['steps']} steps", atol=1e-3)


def test_p2p_generate_command_reproduces_the_reference_in_both_layouts(golden, tiny_file, tiny_folder, tmp_path):
    """The acceptance run: `p2p generate`, 10 steps, 128x128, either layout, within 1e-3."""
    case, size = golden["meta"]["e2e"], int(golden["meta"]["size"])
    latents = []
    for name, weights in (("file", tiny_file), ("folder", tiny_folder)):
        argv = ["generate", "--weights", str(weights), "--seed", str(case["seed"]), "--steps", str(case["steps"]),
                "--guidance", golden["meta"]["guidance"], "--height", str(size), "--width", str(size),
                "--out", str(tmp_path / f"{name}.png"), "--latents-out", str(tmp_path / f"{name}.safetensors")]
        for prompt in case["prompts"]:
            argv += ["--prompt", prompt]
        assert main(argv) == 0
        latents.append(load_file(str(tmp_path / f"{name}.safetensors"))["latents"])
        assert_close(latents[-1], golden["e2e"], f"p2p generate ({name}) latents", atol=1e-3)
    assert torch.equal(latents[0], latents[1])


@torch.no_grad()
def test_unet_at_sizes_off_the_multiples_of_64(odd_golden, tiny):
    """Each upsampler lands on the size of the skip it meets next, as diffusers' does: 9 -> 5 -> 9."""
    for h, w in odd_golden["meta"]["latents"]:
        eps = tiny.unet(odd_golden[f"unet.x.{h}x{w}"], 500, odd_golden["context"])
        assert_close(eps, odd_golden[f"unet.eps.{h}x{w}"], f"UNet eps at latents {w}x{h} (WIDTHxHEIGHT)")


def test_generate_at_200x72(odd_golden, tiny):
    case = odd_golden["meta"]["e2e"]
    latents = generate(tiny, case["prompts"], seed=case["seed"], steps=case["steps"],
                       guidance=float(odd_golden["meta"]["guidance"]), height=case["height"], width=case["width"],
                       progress=False)
    assert_close(latents, odd_golden["e2e"], f"latents at {case['width']}x{case['height']}", atol=1e-3)
