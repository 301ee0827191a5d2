"""Write tests/golden/plms.safetensors: PLMS sampling and edits by an independent implementation.

How it was run (once, fp32 on CPU, from the repository root):

    pip install diffusers==0.42.1      # the reference; never a dependency of p2p, models/ or tests/
    python scripts/make_golden_plms.py # -> tests/golden/plms.safetensors

The sampler is diffusers' PNDMScheduler with the SD v1.4 scheduler config the official SD
notebook ran (skip_prk_steps, scaled-linear betas 0.00085..0.012, steps_offset 1,
set_alpha_to_one false); the loop is the notebook's: one scheduler.step per UNet call, then the
controller's step callback (local blend) on the latents that go into the next call. The edits
are scripts/make_golden_p2p.py's reference controller, which counts UNet calls as the authors'
controller does, so with PLMS's N + 1 calls the edit sees steps 0..N and uses the whole
N+1-row cross table. Added here, again written from reading the official code:
- the authors' replace mapper (seq_aligner.get_replacement_mapper_): after the last swapped
  word, target column j reads source column j while both token walks stay inside 77;
- a local blend start as the null-text notebook counts it: its counter is incremented on every
  update and the blend acts once the counter exceeds int(start * N).
Nothing of p2p/ or models/ is used, except scripts/make_tiny.py to write the weights.
"""
import json
import sys
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import PNDMScheduler
from diffusers.models.attention_processor import AttnProcessor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import make_golden  # noqa: E402
import make_golden_p2p as ref  # noqa: E402   (the reference controller, edits, blend and models)

OUT = ROOT / "tests" / "golden" / "plms.safetensors"
STEPS, SEED, GUIDANCE, M = ref.STEPS, 0, 7.5, ref.M      # 10 steps -> 11 UNet calls
# CompVis/stable-diffusion-v1-4 scheduler/scheduler_config.json
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
CAT, DOG, HOUSE, POPPY = ref.CAT, ref.DOG, ref.HOUSE, ref.POPPY
BURGER, TIRAMISU = ref.BURGER, ref.TIRAMISU          # "burger" 1 token, "tiramisu" 3: the mappers differ
BLEND = dict(prompts=[BURGER, TIRAMISU], cross="replace", size=256, blend=[["burger"], ["tiramisu"]],
             threshold=0.75, cross_steps={"default": 0.8, "tiramisu": [0.0, 0.4]})
CASES = {
    "plain": dict(prompts=[CAT, HOUSE], cross="none"),
    "replace": dict(prompts=[CAT, DOG], cross="replace"),
    "replace_official": dict(prompts=[BURGER, TIRAMISU], cross="replace", mapper="official"),
    "refine": dict(prompts=[HOUSE, HOUSE + " at winter"], cross="refine"),
    "reweight": dict(prompts=[POPPY, POPPY], cross=None, scales={"night": 2.0}),
    # 256 px: the 16x16 maps the blend reads are a level below the 32x32 latents (down 2 + up 3 layers)
    "replace_blend": dict(BLEND, mapper="aligned"),
    "replace_blend_official": dict(BLEND, mapper="official"),
    "replace_blend_start": dict(BLEND, mapper="aligned", blend_start=0.2),
}
DEFAULTS = dict(cross_steps=0.8, self_steps=0.4, scales=None, blend=None, threshold=0.3, size=128,
                mapper="aligned", blend_start=0.0)


def fail(message: str):
    sys.exit(f"make_golden_plms: {message}")


def official_replace_mapper(tokenizer, source: str, target: str) -> torch.Tensor:
    """The authors' walk over both token sequences, start token to padding."""
    src_words, tgt_words = source.split(" "), target.split(" ")
    src_cols, tgt_cols = ref.word_columns(tokenizer, source), ref.word_columns(tokenizer, target)
    swaps = [(s, t) for a, b, s, t in zip(src_words, tgt_words, src_cols, tgt_cols) if a != b]
    mapper, i, j, k = torch.zeros(M, M), 0, 0, 0
    while i < M and j < M:
        if k < len(swaps) and swaps[k][0][0] == i:          # a swapped word starts at source token i
            s, t = swaps[k]
            if len(s) == len(t):
                mapper[s, t] = 1.0                           # pairs (s[0], t[0]), (s[1], t[1]), ...
            else:
                mapper[s[0]:s[-1] + 1, t[0]:t[-1] + 1] = 1 / len(t)
            i, j, k = i + len(s), j + len(t), k + 1
        else:
            mapper[i if k < len(swaps) else j, j] = 1.0     # before the last swap M[i, j], after it M[j, j]
            i, j = i + 1, j + 1
    return mapper


class Blend(ref.LocalBlend):
    """The reference blend with the null-text notebook's start counter."""

    def __init__(self, tokenizer, prompts, words, threshold, start: int):
        super().__init__(tokenizer, prompts, words, threshold)
        self.start, self.counter = start, 0

    def __call__(self, x, maps):
        self.counter += 1
        return super().__call__(x, maps) if self.counter > self.start else x


def x_T(seed: int, size: int) -> torch.Tensor:
    return torch.randn((1, 4, size // 8, size // 8), generator=make_golden.seeded(seed))


@torch.no_grad()
def text2image_plms(unet, encode, prompts, size: int, controller=None) -> tuple[torch.Tensor, list[int]]:
    """The notebook's loop with PNDM: shared x_T, CFG batch [uncond, cond], scheduler.step, callback."""
    context = torch.cat([encode([""] * len(prompts)), encode(prompts)])
    scheduler = PNDMScheduler(**SCHEDULER)
    scheduler.set_timesteps(STEPS)
    x = x_T(SEED, size).expand(len(prompts), -1, -1, -1)
    for t in scheduler.timesteps:
        eps_uncond, eps_cond = unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample.chunk(2)
        x = scheduler.step(eps_uncond + GUIDANCE * (eps_cond - eps_uncond), t, x).prev_sample
        if controller is not None:
            x = controller.step_callback(x)
    if controller is not None and controller.step != STEPS + 1:
        fail(f"the controller counted {controller.step} UNet calls, not {STEPS + 1}")
    return x, scheduler.timesteps.tolist()


def main():
    tmp, folder, unet, tokenizer, encode = ref.reference_models()
    g = {"fingerprint": make_golden.fingerprint(folder)}
    cases = {name: {**DEFAULTS, **case} for name, case in CASES.items()}
    plain = {}
    for name, case in cases.items():
        prompts, size = case["prompts"], case["size"]
        unet.set_attn_processor(AttnProcessor())             # diffusers' own attention, no controller
        for p in prompts:   # each prompt alone, no edit: the source must stay, the targets must move
            if (p, size) not in plain:
                plain[p, size] = text2image_plms(unet, encode, [p], size)[0][0]
        if case["cross"] == "none":
            g[name], timesteps = text2image_plms(unet, encode, prompts, size)
            print(f"{name:24s} timesteps {timesteps}")
            continue
        controller = ref.Controller(tokenizer, prompts, case["cross"], case["scales"], case["cross_steps"],
                                    case["self_steps"], None, case["threshold"])
        if case["mapper"] == "official":
            mappers = torch.stack([official_replace_mapper(tokenizer, prompts[0], p) for p in prompts[1:]])
            if torch.equal(mappers, controller.cross.mappers):
                fail(f"{name}: the official mapper equals ours for these prompts; pick words whose token counts differ")
            controller.cross.mappers = mappers
        if case["blend"]:
            controller.blend = Blend(tokenizer, prompts, case["blend"], case["threshold"],
                                     int(case["blend_start"] * STEPS))
        ref.install(unet, controller)
        g[name] = edited = text2image_plms(unet, encode, prompts, size, controller)[0]
        src_err = ref.max_diff(edited[0], plain[prompts[0], size])
        moved = [ref.max_diff(x, plain[p, size]) for x, p in zip(edited[1:], prompts[1:])]
        print(f"{name:24s} source vs plain {src_err:.1e}, targets moved by {', '.join(f'{m:.3f}' for m in moved)}")
        if src_err > ref.TOL or min(moved) < 100 * ref.TOL:
            fail(f"{name}: the edit changed the source or left a target as it was")
        if controller.blend is not None:
            coverage, margin = zip(*controller.blend.log)
            print(f"{'':24s} blend mask coverage per update {[[round(c, 2) for c in cs] for cs in coverage]}")
            if min(margin) < 1e-5:
                fail(f"{name}: an attention ratio is within {min(margin):.1e} of the blend threshold")
    for case, other in (("replace_blend_official", "replace_blend"), ("replace_blend_start", "replace_blend")):
        if ref.max_diff(g[case], g[other]) < 10 * ref.TOL:
            fail(f"{case} gives the latents of {other}: its setting changed nothing")

    metadata = {
        "command": "pip install diffusers==0.42.1 && python scripts/make_golden_plms.py",
        "torch": torch.__version__, "transformers": transformers.__version__, "diffusers": diffusers.__version__,
        "cases": json.dumps(cases),
        "sampling": json.dumps(dict(steps=STEPS, seed=SEED, guidance=GUIDANCE, negative="", scheduler=SCHEDULER,
                                    unet_calls=STEPS + 1)),
        "settings": json.dumps(dict(self_max_tokens=ref.SELF_MAX_TOKENS, blend_res=ref.BLEND_RES)),
        "keys": "CASE [len(prompts), 4, size/8, size/8]: final latents of the case's prompts after 10 PLMS steps",
    }
    make_golden.write(OUT, g, metadata)
    tmp.cleanup()


if __name__ == "__main__":
    main()
