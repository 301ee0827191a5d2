"""Write tests/golden/tiny.safetensors: reference outputs of an independent SD v1 implementation.

How it was run (once, fp32 on CPU, from the repository root):

    pip install diffusers==0.42.1      # the reference; never a dependency of p2p, models/ or tests/
    python scripts/make_golden.py      # -> tests/golden/tiny.safetensors (~0.5 MB)
    python scripts/make_golden.py --odd-size   # -> tests/golden/odd_size.safetensors only (~50 KB)

--odd-size records sizes that are multiples of 8 but not of 64, where each upsampler must meet
its skip's size: UNet eps on latents 9 x 25, 1 x 25 and 2 x 3 (h x w), and a 3-step pipeline
run at 200x72 pixels. It leaves tiny.safetensors as it is. (It was run in a separate venv:
torch==2.13.0, then diffusers==0.42.1 transformers, never in the project's.)

The reference is diffusers (UNet2DConditionModel, AutoencoderKL, DDIMScheduler,
StableDiffusionPipeline) with transformers' CLIPTextModel and CLIPTokenizer, all loaded with
`from_pretrained` from the local diffusers-layout folder that scripts/make_tiny.py writes; the
script only calls that library and copies none of its code. The torch, transformers and
diffusers versions used are recorded in the file's metadata. Steps:

1. write the tiny seeded checkpoint (both layouts) into a temporary directory;
2. convert the single file with diffusers' own LDM -> diffusers functions and require every
   tensor to equal the folder's (so make_tiny's two layouts agree by a third party's rename);
3. check the reference models were filled from the files, tensor for tensor;
4. record the inputs and outputs tests/test_golden.py compares against, and a fingerprint of
   the weights so a test can tell "make_tiny changed" from "the network is wrong".
"""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"          # local files only: nothing may come from a hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import diffusers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import make_tiny  # noqa: E402

OUT = ROOT / "tests" / "golden" / "tiny.safetensors"
ODD_OUT = ROOT / "tests" / "golden" / "odd_size.safetensors"
# latent (h, w) of 200x72, 200x8 and 24x16 pixels (WIDTHxHEIGHT); not 1x1: the tiny model's first
# GroupNorm has 1 channel per group, and one value per group is an error in torch
ODD_LATENTS = [(9, 25), (1, 25), (2, 3)]
ODD_E2E = dict(prompts=["a cat riding a bicycle"], steps=3, seed=0, height=72, width=200)
PROMPTS = ["a cat riding a bicycle", "", "A photo of a squirrel eating a burger"]
UNET_CONTEXT_ROWS = [0, 2]                 # the UNet golden's context: hidden states of these prompts
UNET_TIMESTEPS = [981, 500, 1]
SIZE = 128                                 # image side; latents are SIZE / 8
GUIDANCE = 7.5
TRAJECTORY = dict(prompt="a cat riding a bicycle", steps=5, seed=0)
E2E = dict(prompts=["a cat riding a bicycle", "a dog riding a bicycle"], steps=10, seed=0)
E2E_NEGATIVE = dict(prompts=["a cat riding a bicycle"], negative="blurry", steps=10, seed=3)
# SD v1's scheduler_config.json (v1.4 / v1.5 repositories), as P2P's official code builds it
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
COMPONENTS, fingerprint = make_tiny.COMPONENTS, make_tiny.fingerprint


def fail(message: str):
    sys.exit(f"make_golden: {message}")


def write(out: Path, tensors: dict, metadata: dict[str, str]):
    """Save goldens (the make_golden*.py scripts all end here) and say where and how big."""
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(out), metadata=metadata)
    print(f"wrote {out.relative_to(ROOT)} ({out.stat().st_size / 1024:.0f} KiB, {len(tensors)} tensors)")


def seeded(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def x_T(seed: int) -> torch.Tensor:
    """The shared initial noise of P2P: randn((1, 4, h, w)) from a CPU generator."""
    return torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=seeded(seed))


def require_equal(ours: dict, ref: dict, what: str):
    """Same names, same shapes, bit-identical values."""
    if ours.keys() != ref.keys():
        fail(f"{what}: names differ: only converted {sorted(ours.keys() - ref.keys())[:5]}, "
             f"only folder {sorted(ref.keys() - ours.keys())[:5]}")
    for k in sorted(ref):
        if ours[k].shape != ref[k].shape or not torch.equal(ours[k], ref[k]):
            fail(f"{what}: {k} differs (shapes {tuple(ours[k].shape)} vs {tuple(ref[k].shape)})")
    print(f"  {what}: {len(ref)} tensors identical")


def check_single_file(tiny: Path, folder: Path):
    """diffusers' own conversion of the LDM single file must give the folder's tensors exactly."""
    ckpt = load_file(str(tiny / "tiny.safetensors"))
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    unet = convert_ldm_unet_checkpoint(ckpt, unet_cfg)
    vae = convert_ldm_vae_checkpoint(ckpt, vae_cfg)   # also turns the 1x1-conv attention into linear
    prefix = "cond_stage_model.transformer."
    text = {k[len(prefix):]: v for k, v in ckpt.items() if k.startswith(prefix) and not k.endswith("position_ids")}
    require_equal(unet, load_file(str(folder / COMPONENTS["unet"])), "single-file UNet (convert_ldm_unet_checkpoint)")
    require_equal(vae, load_file(str(folder / COMPONENTS["vae"])), "single-file VAE (convert_ldm_vae_checkpoint)")
    require_equal(text, load_file(str(folder / COMPONENTS["text_encoder"])), "single-file CLIP (prefix stripped)")
    counts = {p: sum(k.startswith(p) for k in ckpt) for p in ("model.diffusion_model.", "first_stage_model.")}
    if counts != {"model.diffusion_model.": len(unet), "first_stage_model.": len(vae)}:
        fail(f"the conversion left tensors of the single file unused: {counts} vs {len(unet)}, {len(vae)}")
    if not torch.equal(ckpt[prefix + "text_model.embeddings.position_ids"], torch.arange(77)[None]):
        fail("position_ids of the single file is not arange(77)")


def check_filled(model: torch.nn.Module, file: Path, what: str):
    """from_pretrained only warns about missing weights; require every parameter from the file."""
    sd = load_file(str(file))
    loaded = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    if what == "text_encoder" and not any(k.startswith("text_model.") for k in loaded):
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}   # transformers 5 naming
    require_equal(loaded, sd, f"{what} as loaded by from_pretrained")


def scheduler_alphas(scheduler: DDIMScheduler, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(timesteps, alpha_t, alpha_prev) exactly as DDIMScheduler.step picks them, probed by a step."""
    scheduler.set_timesteps(steps)
    ts = scheduler.timesteps.clone()
    alpha_t = scheduler.alphas_cumprod[ts]
    stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps     # as in step()
    alpha_prev = torch.stack([scheduler.alphas_cumprod[t - stride] if t >= stride else scheduler.final_alpha_cumprod
                              for t in ts.tolist()])
    for t, a, ap in zip(ts, alpha_t, alpha_prev):   # eps = 0, x = 1: step gives sqrt(alpha_prev / alpha_t)
        probe = scheduler.step(torch.zeros(1), t, torch.ones(1)).prev_sample.double()
        if abs(probe.item() - (ap.double() / a.double()).sqrt().item()) > 1e-6:
            fail(f"alpha_prev at t={int(t)} is not what DDIMScheduler.step uses")
    return ts, alpha_t, alpha_prev


def write_odd_size(unet, vae, text_encoder, tokenizer, folder: Path):
    """Sizes off the multiples of 64: upsampling must land on the skip's odd size, as in diffusers."""
    ids = tokenizer(PROMPTS[:1], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    g = {"fingerprint": fingerprint(folder), "context": text_encoder(ids)[0]}
    for h, w in ODD_LATENTS:
        g[f"unet.x.{h}x{w}"] = x = torch.randn((1, 4, h, w), generator=seeded(4))
        g[f"unet.eps.{h}x{w}"] = unet(x, torch.tensor(500), encoder_hidden_states=g["context"]).sample
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    c = ODD_E2E
    latents = torch.randn((1, 4, c["height"] // 8, c["width"] // 8), generator=seeded(c["seed"]))
    g["e2e"] = pipe(c["prompts"], height=c["height"], width=c["width"], num_inference_steps=c["steps"],
                    guidance_scale=GUIDANCE, eta=0.0, latents=latents, output_type="latent").images
    metadata = {"command": "pip install diffusers==0.42.1 && python scripts/make_golden.py --odd-size",
                "torch": torch.__version__, "transformers": transformers.__version__,
                "diffusers": diffusers.__version__, "prompt": PROMPTS[0], "unet_timestep": "500",
                "latents": json.dumps(ODD_LATENTS), "guidance": str(GUIDANCE), "e2e": json.dumps(ODD_E2E)}
    write(ODD_OUT, g, metadata)


@torch.no_grad()
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--odd-size", action="store_true", help="write only tests/golden/odd_size.safetensors")
    args = ap.parse_args(argv)
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)   # nothing below should draw from the global generator; seeded anyway
    tmp = tempfile.TemporaryDirectory()
    tiny = Path(tmp.name)
    make_tiny.main([str(tiny)])
    folder = tiny / "tiny-diffusers"
    print("checking the single-file layout with diffusers' converters")
    check_single_file(tiny, folder)

    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"), torch_dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(str(folder / "vae"), torch_dtype=torch.float32).eval()
    text_encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), torch_dtype=torch.float32).eval()
    # the folder holds vocab.json + merges.txt only; these two settings are those of the
    # tokenizer_config.json SD v1 ships (openai/clip-vit-large-patch14)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), model_max_length=77, pad_token="<|endoftext|>")
    print("checking the reference models hold the files' weights")
    for model, name in ((unet, "unet"), (vae, "vae"), (text_encoder, "text_encoder")):
        check_filled(model, folder / COMPONENTS[name], name)
    if args.odd_size:
        write_odd_size(unet, vae, text_encoder, tokenizer, folder)
        return tmp.cleanup()
    scheduler = DDIMScheduler(**SCHEDULER)

    g = {"fingerprint": fingerprint(folder)}

    def encode(prompts):   # as StableDiffusionPipeline.encode_prompt does it (no clip skip)
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        return ids, text_encoder(ids)[0]

    # text encoder
    g["text.ids"], g["text.hidden"] = encode(PROMPTS)

    # UNet: one call at three noise levels
    g["unet.x"] = torch.randn((2, 4, SIZE // 8, SIZE // 8), generator=seeded(1))
    g["unet.context_rows"] = torch.tensor(UNET_CONTEXT_ROWS)
    context = g["text.hidden"][UNET_CONTEXT_ROWS]
    for t in UNET_TIMESTEPS:
        g[f"unet.eps.{t}"] = unet(g["unet.x"], torch.tensor(t), encoder_hidden_states=context).sample

    # VAE: the decoder takes scaled latents z (SD divides by the scaling factor first)
    g["vae.z"] = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=seeded(2))
    g["vae.decoded"] = vae.decode(g["vae.z"] / vae.config.scaling_factor).sample
    # encoder: an 8-bit RGB image, stored as uint8, mapped to [-1, 1] as pipelines do
    g["vae.image_u8"] = torch.randint(0, 256, (1, 3, SIZE, SIZE), generator=seeded(3), dtype=torch.uint8)
    posterior = vae.encode(g["vae.image_u8"].float() / 127.5 - 1).latent_dist
    g["vae.mean"], g["vae.logvar"] = posterior.mean, posterior.logvar

    # scheduler
    g["ddim.alphas_cumprod"] = scheduler.alphas_cumprod.clone()
    for steps in (5, 50):
        g[f"ddim.{steps}.timesteps"], g[f"ddim.{steps}.alpha_t"], g[f"ddim.{steps}.alpha_prev"] = \
            scheduler_alphas(scheduler, steps)

    # 5-step DDIM trajectory, by hand: CFG batch [uncond, cond], empty negative prompt
    g["x_T.0"], g["x_T.3"] = x_T(0), x_T(3)
    _, cond = encode([TRAJECTORY["prompt"]])
    _, uncond = encode([""])
    context = torch.cat([uncond, cond])
    scheduler.set_timesteps(TRAJECTORY["steps"])
    x, trajectory = g["x_T.0"], []
    for t in scheduler.timesteps:
        eps_uncond, eps_cond = unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample.chunk(2)
        x = scheduler.step(eps_uncond + GUIDANCE * (eps_cond - eps_uncond), t, x).prev_sample
        trajectory.append(x)
    g["trajectory"] = torch.stack(trajectory)   # [steps, 1, 4, h, w], latents after each step

    # end to end: the pipeline, one x_T shared by the prompts, final latents (before 1/0.18215)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for key, case in (("e2e", E2E), ("e2e_negative", E2E_NEGATIVE)):
        n = len(case["prompts"])
        negative = [case["negative"]] * n if "negative" in case else None   # None: the pipeline uses ""
        g[key] = pipe(case["prompts"], negative_prompt=negative, height=SIZE, width=SIZE,
                      num_inference_steps=case["steps"], guidance_scale=GUIDANCE, eta=0.0,
                      latents=x_T(case["seed"]).expand(n, -1, -1, -1).clone(), output_type="latent").images

    metadata = {
        "command": "pip install diffusers==0.42.1 && python scripts/make_golden.py",
        "torch": torch.__version__, "transformers": transformers.__version__, "diffusers": diffusers.__version__,
        "prompts": json.dumps(PROMPTS), "unet_timesteps": json.dumps(UNET_TIMESTEPS),
        "fingerprint_rows": json.dumps(list(COMPONENTS)),
        "fingerprint_columns": json.dumps(["count", "sum", "abs_sum"]),
        "scheduler": json.dumps(SCHEDULER), "size": str(SIZE), "guidance": str(GUIDANCE),
        "trajectory": json.dumps(TRAJECTORY), "e2e": json.dumps(E2E), "e2e_negative": json.dumps(E2E_NEGATIVE),
    }
    write(OUT, g, metadata)
    tmp.cleanup()


if __name__ == "__main__":
    main()
