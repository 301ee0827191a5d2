"""Write tests/golden/sd2.safetensors: reference outputs for the tiny SD 2-shaped checkpoint.

How it was run (once, fp32 on CPU, from the repository root, in a separate venv with
torch==2.13.0 and diffusers==0.42.1, transformers; never in the project's):

    python scripts/make_golden_sd2.py      # -> tests/golden/sd2.safetensors (~0.3 MB)

References, all independent of p2p's code:
- the text encoder twice: transformers' CLIPTextModel from the diffusers folder (23-of-24-style
  layers, exact GELU), and a plain-torch forward of the single file's OpenCLIP text tower
  written here from its definition (token + positional embedding, the resblocks but the last
  with a causal mask, ln_final: what SD 2's FrozenOpenCLIPEmbedder(layer="penultimate") does).
  The two must agree, which checks make_tiny's reverse rename by a second route;
- the UNet: diffusers' UNet2DConditionModel (linear projections, heads per level) at three
  timesteps;
- 10-step generation: StableDiffusionPipeline with DDIMScheduler, once with
  prediction_type "epsilon" and once with "v_prediction" (the same weights: the UNet does not
  know what it predicts; the scheduler reads its output as eps or as v).
"""
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import diffusers  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import make_golden  # noqa: E402
import make_tiny  # noqa: E402

OUT = ROOT / "tests" / "golden" / "sd2.safetensors"
PROMPTS = ["a cat riding a bicycle", "", "A photo of a squirrel eating a burger"]
UNET_TIMESTEPS = [981, 500, 1]
SIZE, GUIDANCE = 128, 7.5
E2E = dict(prompts=["a cat riding a bicycle", "a dog riding a bicycle"], steps=10, seed=0)
PREDICTIONS = ("epsilon", "v_prediction")
TEXT_PREFIX = "cond_stage_model.model."


def open_clip_penultimate(ckpt: dict, ids: torch.Tensor) -> torch.Tensor:
    """SD 2's text conditioning from the single file's OpenCLIP tensors, by the definition:
    x = token_embedding[ids] + positional_embedding; every resblock but the last,
    x += attn(ln_1(x)) (causal, heads of width 64), x += c_proj(gelu(c_fc(ln_2(x)))); ln_final(x)."""
    w = {k[len(TEXT_PREFIX):]: v.double() for k, v in ckpt.items() if k.startswith(TEXT_PREFIX)}
    blocks = 1 + max(int(k.split(".")[2]) for k in w if k.startswith("transformer.resblocks."))
    x = w["token_embedding.weight"][ids] + w["positional_embedding"]
    n, width = x.shape[1], x.shape[2]
    heads = width // 64
    causal = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)
    ln = lambda y, name: F.layer_norm(y, (width,), w[f"{name}.weight"], w[f"{name}.bias"])
    for i in range(blocks - 1):
        p = f"transformer.resblocks.{i}."
        q, k, v = F.linear(ln(x, p + "ln_1"), w[p + "attn.in_proj_weight"], w[p + "attn.in_proj_bias"]).chunk(3, -1)
        q, k, v = (t.unflatten(-1, (heads, 64)).transpose(1, 2) for t in (q, k, v))
        attn = ((q @ k.transpose(-1, -2)) / 8 + causal).softmax(-1) @ v
        x = x + F.linear(attn.transpose(1, 2).flatten(2), w[p + "attn.out_proj.weight"], w[p + "attn.out_proj.bias"])
        h = F.gelu(F.linear(ln(x, p + "ln_2"), w[p + "mlp.c_fc.weight"], w[p + "mlp.c_fc.bias"]))
        x = x + F.linear(h, w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"])
    return ln(x, "ln_final").float()


@torch.no_grad()
def main():
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    tmp = tempfile.TemporaryDirectory()
    tiny = Path(tmp.name)
    make_tiny.main([str(tiny), "--sd2"])
    single, folder = tiny / "tiny-sd2.safetensors", tiny / "tiny-sd2-diffusers"
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"), torch_dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(str(folder / "vae"), torch_dtype=torch.float32).eval()
    text_encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), torch_dtype=torch.float32).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), model_max_length=77, pad_token="!")
    for model, name in ((unet, "unet"), (vae, "vae"), (text_encoder, "text_encoder")):
        make_golden.check_filled(model, folder / make_tiny.COMPONENTS[name], name)
    if not unet.config.use_linear_projection or text_encoder.config.hidden_act != "gelu":
        make_golden.fail("the tiny SD 2 folder is not SD 2-shaped (linear projections, exact GELU)")

    g = {"fingerprint": make_tiny.fingerprint(folder)}
    g["text.ids"] = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids
    g["text.hidden"] = text_encoder(g["text.ids"])[0]
    by_definition = open_clip_penultimate(load_file(str(single)), g["text.ids"])
    error = (by_definition - g["text.hidden"]).abs().max().item()
    print(f"  text: CLIPTextModel (folder) vs the OpenCLIP tower by definition (single file): {error:.2e}")
    if error > 1e-5:
        make_golden.fail("the folder's text encoder and the single file's OpenCLIP tower disagree")

    g["unet.x"] = torch.randn((2, 4, SIZE // 8, SIZE // 8), generator=make_golden.seeded(1))
    context = g["text.hidden"][[0, 2]]
    for t in UNET_TIMESTEPS:
        g[f"unet.out.{t}"] = unet(g["unet.x"], torch.tensor(t), encoder_hidden_states=context).sample

    n = len(E2E["prompts"])
    x_T = make_golden.x_T(E2E["seed"])
    for prediction in PREDICTIONS:
        scheduler = DDIMScheduler(**make_golden.SCHEDULER, prediction_type=prediction)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        g[f"e2e.{prediction}"] = pipe(E2E["prompts"], height=SIZE, width=SIZE, num_inference_steps=E2E["steps"],
                                      guidance_scale=GUIDANCE, eta=0.0, latents=x_T.expand(n, -1, -1, -1).clone(),
                                      output_type="latent").images
    metadata = {"command": "python scripts/make_golden_sd2.py", "torch": torch.__version__,
                "transformers": transformers.__version__, "diffusers": diffusers.__version__,
                "prompts": json.dumps(PROMPTS), "unet_timesteps": json.dumps(UNET_TIMESTEPS), "size": str(SIZE),
                "guidance": str(GUIDANCE), "e2e": json.dumps(E2E), "scheduler": json.dumps(make_golden.SCHEDULER),
                "text_definition_error": f"{error:.3g}"}
    make_golden.write(OUT, g, metadata)
    tmp.cleanup()


if __name__ == "__main__":
    main()
