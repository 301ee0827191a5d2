"""Write tests/golden/p2p.safetensors: Prompt-to-Prompt edits by an independent implementation.

How it was run (once, fp32 on CPU, from the repository root):

    pip install diffusers==0.42.1      # the reference; never a dependency of p2p, models/ or tests/
    python scripts/make_golden_p2p.py  # -> tests/golden/p2p.safetensors (~150 KB)

This is an independent re-implementation of the official Prompt-to-Prompt semantics
(google/prompt-to-prompt: ptp_utils.py, seq_aligner.py, prompt-to-prompt_stable.ipynb), written
from reading them, not copied, and run on diffusers' UNet2DConditionModel (with transformers' CLIP)
loaded from the tiny diffusers-layout folder of scripts/make_tiny.py, as scripts/make_golden.py
loads it. Like the official code it installs custom attention processors
(`unet.set_attn_processor`) that compute softmax(q k^T * d^-0.5) in every layer and hand it to
one controller object, which counts layers to know the step, edits only the conditional half of
the CFG batch [uncond b rows, cond b rows], and appends each cross-attention map to its step
store *before* editing that tensor in place (so the store holds the edited maps); the store is
summed over steps. The sampling loop is the official text2image one (shared x_T, CFG with "",
DDIMScheduler step, then the controller's step callback). Nothing of p2p/ or models/ is used,
except scripts/make_tiny.py to write the weights.

DESIGN.md's deliberate deviations from the official code, followed here:
- Replace mapper: after the last swapped word it sets M[i, j] (source token i, target token j
  along the alignment), not the official M[j, j], so EOS and padding stay aligned when the
  swapped words' token counts differ.
- Local blend: the mask of target i is mask_source OR mask_i and
  x_t[i] = x_t[0] + mask_i * (x_t[i] - x_t[0]) for every target (the per-target form, which also
  works with several targets), and its layers are picked by resolution (the down and up blocks'
  cross-attention at 16x16: down_blocks.0 and up_blocks.3 at 128 px), not by the official list
  slices down_cross[2:4] + up_cross[:3] (which rely on the store dropping maps above 32x32).
Kept as the official code has it: the cross-attention table has N+1 rows (step i edited when
int(s*(N+1)) <= i < int(e*(N+1))), self-attention is injected for steps [int(s0*N), int(s1*N)),
Refine aligns the full token sequences (start and end tokens included) by Needleman-Wunsch with
gap 0, match 1, mismatch -1, ties going left, then up, then diagonal, and maps padding columns
to themselves; Reweight scales E_prev (the Replace/Refine result, or the source's maps).
Decisions where the official code is silent or ambiguous (also in the file's metadata):
- word -> token columns: each space-separated word is tokenized on its own (CLIP's BPE never
  merges across a space; checked against the whole prompt's tokens), instead of the official
  decode-and-count-characters walk; every occurrence of a word is selected, as officially.
- Reweight: each target gets the scales of the chosen words it contains (the official code
  builds one equalizer from the first target and applies it to all targets).
- Self-attention injection where the query/key length is <= 16*16 (the official test reads the
  query length; for self-attention the two are equal).
- Replace where the target word has fewer tokens (case replace_merge): with M[i, j] the last
  target columns (padding) have no aligned source column left; they take the source's last
  column (padding too), as p2p/align.py documents it, so every target column is fed (DESIGN.md
  does not say; taken literally, M[i, j] would leave them at 0).
"""
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"          # local files only: nothing may come from a hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import diffusers  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from diffusers import DDIMScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import make_golden  # noqa: E402   (its loading checks, schedule settings and x_T)
import make_tiny  # noqa: E402

OUT = ROOT / "tests" / "golden" / "p2p.safetensors"
M = 77                  # CLIP context length: token columns of every cross-attention map
STEPS, SEED = 10, 0
SIZE, GUIDANCE = make_golden.SIZE, make_golden.GUIDANCE      # 128 px (latents 16x16), 7.5
SELF_MAX_TOKENS = 16 * 16
BLEND_RES = 16
TOL = 1e-3              # the acceptance bar of tests/test_p2p_golden.py (latents reach |x| ~ 45 here)

CAT, DOG, HORSE = "a cat riding a bicycle", "a dog riding a bicycle", "a horse riding a bicycle"
BURGER, TIRAMISU = "a squirrel eating a burger on a table", "a squirrel eating a tiramisu on a table"
HOUSE = "a photo of a house on a mountain"
POPPY = "a photo of a poppy field at night"
# cross = "replace" | "refine" | None; scales = Reweight on top of it (or alone when cross is None).
# The tiny random model's cross-attention is nearly uniform: at threshold 0.3 the blend mask is all
# ones (a no-op), so the *_partial cases use 0.75, where masks cover 65-96% and the source's and
# targets' masks differ in the last steps (the union matters).
CASES = {
    "replace": dict(prompts=[CAT, DOG], cross="replace"),
    "replace_split": dict(prompts=[BURGER, TIRAMISU], cross="replace"),   # 1 -> 3 tokens, words follow
    "replace_merge": dict(prompts=[TIRAMISU, BURGER], cross="replace"),   # 3 -> 1 tokens
    "refine": dict(prompts=[HOUSE, HOUSE + " at winter"], cross="refine"),
    "reweight": dict(prompts=[POPPY, POPPY], cross=None, scales={"night": 2.0}),
    "reweight_zero_negative": dict(prompts=[POPPY, POPPY], cross=None, scales={"poppy": 0.0, "field": -1.0}),
    "refine_reweight": dict(prompts=[HOUSE, "a photo of a house on a snowy mountain"], cross="refine",
                            scales={"snowy": 3.0}),
    "replace_blend": dict(prompts=[CAT, DOG], cross="replace", blend=[["cat"], ["dog"]]),
    "replace_blend_partial": dict(prompts=[CAT, DOG], cross="replace", blend=[["cat"], ["dog"]], threshold=0.75),
    "replace_two_targets": dict(prompts=[CAT, DOG, HORSE], cross="replace"),
    "replace_two_targets_blend": dict(prompts=[CAT, DOG, HORSE], cross="replace",
                                      blend=[["cat"], ["dog"], ["horse"]], threshold=0.75),
    "replace_word_window": dict(prompts=[CAT, DOG], cross="replace", cross_steps={"default": 0.8, "dog": [0.0, 0.4]}),
    # windows where the N+1-row cross table and the N-step self window differ: cross steps 1..7
    # (int(.1*11) = 1, int(.75*11) = 8), self steps 1..6 (int(.1*10) = 1, int(.75*10) = 7)
    "replace_windows": dict(prompts=[CAT, DOG], cross="replace", cross_steps=[0.1, 0.75], self_steps=[0.1, 0.75]),
}
DEFAULTS = dict(cross_steps=0.8, self_steps=0.4, scales=None, blend=None, threshold=0.3)


def fail(message: str):
    sys.exit(f"make_golden_p2p: {message}")


# ---- token alignment ------------------------------------------------------------------------

def word_columns(tokenizer, prompt: str) -> list[list[int]]:
    """Token columns of each space-separated word (column 0 is the start token)."""
    spans, ids, pos = [], [], 1
    for word in prompt.split(" "):
        word_ids = tokenizer(word, add_special_tokens=False).input_ids
        spans.append(list(range(pos, pos + len(word_ids))))
        ids += word_ids
        pos += len(word_ids)
    if [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] != tokenizer(prompt).input_ids:
        fail(f"tokenizing the words of {prompt!r} one by one does not give the prompt's tokens")
    return spans


def columns_of(tokenizer, prompt: str, word: str) -> list[int]:
    """Columns of every occurrence of `word` in `prompt`."""
    spans = word_columns(tokenizer, prompt)
    return [c for w, span in zip(prompt.split(" "), spans) if w == word for c in span]


def replace_mapper(tokenizer, source: str, target: str) -> torch.Tensor:
    """[M, M]: target column j = sum_i source column i * mapper[i, j]."""
    src_words, tgt_words = source.split(" "), target.split(" ")
    if len(src_words) != len(tgt_words):
        fail(f"replace needs prompts with as many words: {source!r}, {target!r}")
    swaps = {s[0]: (s, t) for a, b, s, t in zip(src_words, tgt_words, word_columns(tokenizer, source),
                                               word_columns(tokenizer, target)) if a != b}
    mapper = torch.zeros(M, M)
    i = j = 0                                  # walk both token sequences, start token to padding
    while j < M:
        if i in swaps:
            s, t = swaps[i]
            if len(s) == len(t):
                mapper[s, t] = 1               # pairs (s[0], t[0]), (s[1], t[1]), ...
            else:
                mapper[s[0]:s[-1] + 1, t[0]:t[-1] + 1] = 1 / len(t)   # each source column spread over t
            i, j = i + len(s), j + len(t)
        else:
            mapper[min(i, M - 1), j] = 1       # DESIGN.md: M[i, j] also after the last swap; past the
            i, j = i + 1, j + 1                # source's end, its last (padding) column
    return mapper


def needleman_wunsch(x: list[int], y: list[int]) -> list[int]:
    """Source position of each target token (-1: none); gap 0, match 1, mismatch -1.

    Ties prefer a gap in the source (left), then a gap in the target (up), then the diagonal."""
    score = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]          # gap 0: the borders stay 0
    move = [["left"] * (len(y) + 1)] + [["up"] + [None] * len(y) for _ in x]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            left, up = score[i][j - 1], score[i - 1][j]
            diag = score[i - 1][j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            score[i][j] = best = max(left, up, diag)
            move[i][j] = "left" if best == left else "up" if best == up else "diag"
    partner, i, j = [-1] * len(y), len(x), len(y)
    while i > 0 or j > 0:
        if move[i][j] == "diag":
            i, j = i - 1, j - 1
            partner[j] = i
        elif move[i][j] == "left":
            j -= 1
        else:
            i -= 1
    return partner


def refine_mapper(tokenizer, source: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [M], aligned [M]): target column j takes source column index[j] where aligned[j] is 1."""
    y = tokenizer(target).input_ids
    partner = needleman_wunsch(tokenizer(source).input_ids, y)
    index = torch.tensor([max(p, 0) for p in partner] + list(range(len(y), M)))   # padding: itself
    aligned = torch.tensor([float(p >= 0) for p in partner] + [1.0] * (M - len(y)))
    return index, aligned


# ---- the edits: E [k, heads, n, M] from the source's maps ----------------------------------------

class ReplaceE:
    def __init__(self, tokenizer, prompts):
        self.mappers = torch.stack([replace_mapper(tokenizer, prompts[0], p) for p in prompts[1:]])

    def __call__(self, src, tgt):              # src [heads, n, M], tgt [k, heads, n, M]
        return torch.einsum("hni,kij->khnj", src, self.mappers)


class RefineE:
    def __init__(self, tokenizer, prompts):
        self.index, self.aligned = map(torch.stack, zip(*[refine_mapper(tokenizer, prompts[0], p)
                                                          for p in prompts[1:]]))

    def __call__(self, src, tgt):
        gathered = torch.stack([src[:, :, index] for index in self.index])
        aligned = self.aligned[:, None, None, :]
        return gathered * aligned + tgt * (1 - aligned)


class ReweightE:
    def __init__(self, tokenizer, prompts, scales: dict, prev=None):
        self.scale, self.prev = torch.ones(len(prompts) - 1, M), prev
        for k, target in enumerate(prompts[1:]):
            for word, c in scales.items():
                self.scale[k, columns_of(tokenizer, target, word)] = c

    def __call__(self, src, tgt):
        e = self.prev(src, tgt) if self.prev is not None else src[None].expand_as(tgt)
        return e * self.scale[:, None, None, :]


def cross_alpha_table(tokenizer, prompts, steps: int, windows) -> torch.Tensor:
    """[steps + 1, k, M] as the official table: rows int(s*(N+1)) <= i < int(e*(N+1)) are 1."""
    rows = steps + 1
    windows = dict(windows) if isinstance(windows, dict) else {"default": windows}
    default = windows.pop("default", (0.0, 1.0))
    table = torch.zeros(rows, len(prompts) - 1, M)

    def fill(k, columns, bounds):
        start, end = (0.0, bounds) if isinstance(bounds, (int, float)) else bounds
        table[:, k, columns] = 0
        table[int(start * rows):int(end * rows), k, columns] = 1

    for k in range(len(prompts) - 1):
        fill(k, slice(None), default)
    for word, bounds in windows.items():
        for k, target in enumerate(prompts[1:]):
            if columns_of(tokenizer, target, word):
                fill(k, columns_of(tokenizer, target, word), bounds)
    return table


class LocalBlend:
    """After each step: keep the targets equal to the source outside the chosen words' maps."""

    def __init__(self, tokenizer, prompts, words, threshold):
        self.select, self.threshold = torch.zeros(len(prompts), M), threshold
        self.log = []                          # per step: mask coverage per row, closest ratio to threshold
        for b, (prompt, ws) in enumerate(zip(prompts, words)):
            for w in ws:
                self.select[b, columns_of(tokenizer, prompt, w)] = 1

    def __call__(self, x, maps):               # maps: {"down_cross": [[b*heads, n, M], ...], ...}
        b, n = len(self.select), BLEND_RES * BLEND_RES
        layers = [a.reshape(b, -1, BLEND_RES, BLEND_RES, M) for key in ("down_cross", "up_cross")
                  for a in maps[key] if a.shape[1] == n]
        if len(layers) != 5:
            fail(f"expected 2 + 3 cross-attention layers at {BLEND_RES}x{BLEND_RES}, found {len(layers)}")
        a = torch.cat(layers, dim=1)                                   # [b, layers*heads, 16, 16, M]
        mask = (a * self.select[:, None, None, None, :]).sum(-1).mean(1, keepdim=True)   # [b, 1, 16, 16]
        mask = F.max_pool2d(mask, 3, stride=1, padding=1)
        mask = F.interpolate(mask, size=x.shape[2:])                   # nearest
        ratio = mask / mask.amax(dim=(2, 3), keepdim=True)
        mask = ratio > self.threshold
        mask = (mask | mask[:1]).float()
        self.log.append((mask.mean(dim=(1, 2, 3)).tolist(), (ratio - self.threshold).abs().min().item()))
        return x[:1] + mask * (x - x[:1])


# ---- the controller and the attention processors -------------------------------------------

class Controller:
    """Called by every attention layer; counts layers to know the step, edits the conditional half."""

    def __init__(self, tokenizer, prompts, cross, scales, cross_steps, self_steps, blend, threshold):
        self.b = len(prompts)
        e = {"replace": ReplaceE, "refine": RefineE, None: None}[cross]
        e = e(tokenizer, prompts) if e else None
        self.cross = ReweightE(tokenizer, prompts, scales, prev=e) if scales else e
        self.alpha = cross_alpha_table(tokenizer, prompts, STEPS, cross_steps)
        s0, s1 = (0.0, self_steps) if isinstance(self_steps, (int, float)) else self_steps
        self.self_window = int(s0 * STEPS), int(s1 * STEPS)
        self.blend = LocalBlend(tokenizer, prompts, blend, threshold) if blend else None
        self.num_layers = 0                   # set when the processors are installed
        self.layer = self.step = 0
        self.step_maps = {"down_cross": [], "mid_cross": [], "up_cross": []}
        self.maps = None                      # step_maps summed over the steps so far

    def __call__(self, probs, is_cross: bool, place: str):   # probs [2b*heads, n, m]
        self.edit(probs[probs.shape[0] // 2:], is_cross, place)   # a view: edited in place
        self.layer += 1
        if self.layer == self.num_layers:
            self.layer, self.step = 0, self.step + 1
            self.between_steps()
        return probs

    def edit(self, attn, is_cross, place):    # attn [b*heads, n, m], the conditional half
        if is_cross:
            self.step_maps[f"{place}_cross"].append(attn)     # stored first, edited in place below
        a = attn.view(self.b, -1, *attn.shape[1:])            # [b, heads, n, m]
        if is_cross and self.cross is not None:
            alpha = self.alpha[self.step][:, None, None, :]
            a[1:] = self.cross(a[0], a[1:]) * alpha + (1 - alpha) * a[1:]
        elif not is_cross and self.self_window[0] <= self.step < self.self_window[1] \
                and a.shape[2] <= SELF_MAX_TOKENS:
            a[1:] = a[0]

    def between_steps(self):
        if self.maps is None:
            self.maps = {key: [t.clone() for t in ts] for key, ts in self.step_maps.items()}
        else:
            self.maps = {key: [s + t for s, t in zip(self.maps[key], ts)] for key, ts in self.step_maps.items()}
        self.step_maps = {key: [] for key in self.step_maps}

    def step_callback(self, x):
        return self.blend(x, self.maps) if self.blend is not None else x


class Processor:
    """A diffusers attention processor that materialises the probabilities for the controller."""

    def __init__(self, controller, place: str, is_cross: bool):
        self.controller, self.place, self.is_cross = controller, place, is_cross

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        if (encoder_hidden_states is not None) != self.is_cross or attention_mask is not None \
                or hidden_states.ndim != 3 or attn.residual_connection or attn.rescale_output_factor != 1 \
                or attn.norm_cross or attn.group_norm is not None or attn.spatial_norm is not None:
            fail("an attention layer of the UNet is not a plain SD v1 self/cross attention")
        context = encoder_hidden_states if self.is_cross else hidden_states
        q, k, v = (attn.head_to_batch_dim(t) for t in (attn.to_q(hidden_states), attn.to_k(context),
                                                        attn.to_v(context)))    # [b*heads, tokens, d]
        probs = (q @ k.transpose(1, 2) * attn.scale).softmax(dim=-1)
        probs = self.controller(probs, self.is_cross, self.place)
        return attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(probs @ v)))


def install(unet, controller):
    procs = {name: Processor(controller, name.split("_")[0], name.endswith("attn2.processor"))
             for name in unet.attn_processors}   # "down_blocks.0....attn2.processor" -> "down", cross
    controller.num_layers = len(procs)
    unet.set_attn_processor(procs)           # (empties the dict it is given)


# ---- sampling ------------------------------------------------------------------------------

@torch.no_grad()
def text2image(unet, encode, prompts, controller=None) -> torch.Tensor:
    """The official loop: shared x_T, CFG batch [uncond, cond], DDIM step, then the step callback."""
    context = torch.cat([encode([""] * len(prompts)), encode(prompts)])
    scheduler = DDIMScheduler(**make_golden.SCHEDULER)
    scheduler.set_timesteps(STEPS)
    x = make_golden.x_T(SEED).expand(len(prompts), -1, -1, -1)
    for t in scheduler.timesteps:
        eps_uncond, eps_cond = unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample.chunk(2)
        x = scheduler.step(eps_uncond + GUIDANCE * (eps_cond - eps_uncond), t, x).prev_sample
        if controller is not None:
            x = controller.step_callback(x)
    if controller is not None and controller.step != STEPS:
        fail(f"the controller counted {controller.step} steps, not {STEPS}")
    return x


def max_diff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def reference_models():
    """The tiny checkpoint written anew and loaded by diffusers and transformers (each checked
    filled): (its temporary folder, the diffusers folder, the UNet, the tokenizer, encode(prompts))."""
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    tmp = tempfile.TemporaryDirectory()
    make_tiny.main([tmp.name])
    folder = Path(tmp.name) / "tiny-diffusers"
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"), torch_dtype=torch.float32).eval()
    text_encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), torch_dtype=torch.float32).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), model_max_length=M, pad_token="<|endoftext|>")
    for model, name in ((unet, "unet"), (text_encoder, "text_encoder")):
        make_golden.check_filled(model, folder / make_golden.COMPONENTS[name], name)

    def encode(prompts):
        ids = tokenizer(prompts, padding="max_length", max_length=M, truncation=True, return_tensors="pt").input_ids
        return text_encoder(ids)[0]

    return tmp, folder, unet, tokenizer, encode


def main():
    torch.manual_seed(0)   # nothing below should draw from the global generator; seeded anyway
    tmp, folder, unet, tokenizer, encode = reference_models()
    cases = {name: {**DEFAULTS, **case} for name, case in CASES.items()}
    prompts_all = list(dict.fromkeys(p for case in cases.values() for p in case["prompts"]))
    splits = {p: [tokenizer.convert_ids_to_tokens(tokenizer(w, add_special_tokens=False).input_ids)
                  for w in p.split(" ")] for p in prompts_all}
    unet.set_attn_processor(AttnProcessor())                  # diffusers' own attention
    plain = {p: text2image(unet, encode, [p])[0] for p in prompts_all}   # each prompt alone, no edit
    g = {"fingerprint": make_golden.fingerprint(folder), "plain": torch.stack(list(plain.values()))}

    for name, case in cases.items():
        prompts = case["prompts"]
        controller = Controller(tokenizer, prompts, case["cross"], case["scales"], case["cross_steps"],
                                case["self_steps"], case["blend"], case["threshold"])
        install(unet, controller)
        g[name] = edited = text2image(unet, encode, prompts, controller)
        # sanity: the source row is the source's plain sample; every target moved away from its own
        src_err = max_diff(edited[0], plain[prompts[0]])
        moved = [max_diff(x, plain[p]) for x, p in zip(edited[1:], prompts[1:])]
        print(f"{name:26s} source vs plain {src_err:.1e}, targets moved by {', '.join(f'{m:.3f}' for m in moved)}")
        if src_err > TOL or min(moved) < 100 * TOL:
            fail(f"{name}: the edit changed the source or left a target as it was")
        if controller.blend is not None:
            coverage, margin = zip(*controller.blend.log)
            print(f"{'':26s} blend mask coverage per step {[[round(c, 2) for c in cs] for cs in coverage]}")
            if min(margin) < 1e-5:   # a map this close to the threshold could flip on rounding noise
                fail(f"{name}: an attention ratio is within {min(margin):.1e} of the blend threshold")

    # sanity: our processors with an edit that does nothing give diffusers' own attention's result
    controller = Controller(tokenizer, [CAT, CAT], None, None, 0.0, 0.0, None, 0.3)
    install(unet, controller)
    if max_diff(text2image(unet, encode, [CAT, CAT], controller), plain[CAT].expand(2, -1, -1, -1)) > TOL:
        fail("the custom processors do not reproduce diffusers' attention")
    for case, other in (("replace_word_window", "replace"), ("replace_windows", "replace"), ("replace_blend_partial", "replace"),
                        ("replace_two_targets_blend", "replace_two_targets")):
        if max_diff(g[case], g[other]) < 10 * TOL:
            fail(f"{case} gives the latents of {other}: its extra setting changed nothing")
    print("token splits:", json.dumps(splits))

    metadata = {
        "command": "pip install diffusers==0.42.1 && python scripts/make_golden_p2p.py",
        "torch": torch.__version__, "transformers": transformers.__version__, "diffusers": diffusers.__version__,
        "decisions": json.dumps([
            "replace mapper M[i, j] after the last swapped word (DESIGN.md); when the target is shorter, its "
            "last padding columns take the source's last column (as p2p/align.py documents; DESIGN.md is silent)",
            "local blend: per-target mask_source OR mask_i, layers picked by resolution (16x16 down/up cross)",
            "word columns: each space-separated word tokenized alone; every occurrence of the word",
            "reweight: each target gets the scales of the chosen words it contains",
            "self-attention injected where the key length is <= self_max_tokens"]),
        "cases": json.dumps(cases), "plain_prompts": json.dumps(prompts_all), "token_splits": json.dumps(splits),
        "sampling": json.dumps(dict(steps=STEPS, seed=SEED, size=SIZE, guidance=GUIDANCE, negative="",
                                    scheduler=make_golden.SCHEDULER)),
        "settings": json.dumps(dict(self_max_tokens=SELF_MAX_TOKENS, blend_res=BLEND_RES)),
        "keys": "CASE [1+k, 4, 16, 16]: final latents of the case's [source, targets...] with its edit; "
                "plain [len(plain_prompts), 4, 16, 16]: each of plain_prompts sampled alone without an edit",
    }
    make_golden.write(OUT, g, metadata)
    tmp.cleanup()


if __name__ == "__main__":
    main()
