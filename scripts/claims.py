"""The paper's claims, measured on the baby model against the ground truth of its world (issue 18).

    python scripts/claims.py                      # the baby model of weights/baby/, every claim, a table
    python scripts/claims.py --seeds 8 --json claims.json

Every prompt comes from p2p/eval/world.py (data seed 1000 on: scenes the model never trained on)
and every image is read with the world's palette (world.colour_masks): each colour names one
object, so a generated object's mask is its colour's pixels and a photo's is the generator's own.

| claim         | what is measured, per seed                                                              |
| fidelity      | the caption's objects whose colour covers at least MIN_PIXELS of the image              |
| maps          | a colour or shape word's cross-attention mass inside its object, and the object's share |
|               | of the image (the mass a map spread evenly would have)                                  |
| swap          | a two-object caption, one colour swapped: IoU of each object's mask between source and  |
|               | target, with Prompt-to-Prompt and with the target sampled alone from the same noise      |
| blend         | the same swap with a local blend on the swapped word: PSNR outside both of its masks    |
| reweight      | a one-object caption, its colour word re-weighted 0, 1, 2, 4: the colour's pixel count |
| photos        | the world's images inverted with each method: reconstruction PSNR; a colour swap from  |
|               | the inversion: the swapped object reads the new colour, the other its own               |

The figures are means over the seeds with their standard deviation; tests/test_claims.py asserts
them at fewer seeds.
"""
import argparse
import dataclasses
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from models import BABY, InputError  # noqa: E402
from p2p import align, sampler, viz  # noqa: E402
from p2p.blend import AttentionStore  # noqa: E402
from p2p.eval import world  # noqa: E402
from p2p.experiment import grid, run  # noqa: E402
from p2p.experiment.record import METHODS, Experiment  # noqa: E402

DATA_SEED = 1000         # captions and photos: the training run used data seed 0
MIN_PIXELS = 24          # of 4096 at 64 px: a small triangle covers ~64
SCALES = (0.0, 1.0, 2.0, 4.0)


@dataclasses.dataclass(frozen=True)
class Settings:
    steps: int = 50
    guidance: float = 7.5
    size: int = 64


def spread(values) -> dict:
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    return {"mean": float(v.mean()) if len(v) else math.nan, "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "n": int(len(v))}


def scenes(count: int, objects: int | None = None, offset: int = 0):
    """The first `count` scenes of the claims' data seed, with `objects` objects if given."""
    index = offset
    while count:
        s = world.scene(DATA_SEED, index, 64)
        index += 1
        if objects is None or len(s.objects) == objects:
            count -= 1
            yield index - 1, s


def present(masks: dict, colour: str) -> bool:
    return int(masks[colour].sum()) >= MIN_PIXELS


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else math.nan


def psnr(a, b, where: np.ndarray | None = None) -> float:
    a, b = (np.asarray(x.convert("RGB"), dtype=float) / 255 for x in (a, b))
    d = (a - b) ** 2
    mse = d[where].mean() if where is not None else d.mean()
    return float(10 * math.log10(1 / max(mse, 1e-10)))


def grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    """The mask dilated by `pixels` (a square neighbourhood): antialiased edges and small shifts."""
    out = mask.copy()
    for _ in range(pixels):
        out[1:] |= out[:-1].copy()
        out[:-1] |= out[1:].copy()
        out[:, 1:] |= out[:, :-1].copy()
        out[:, :-1] |= out[:, 1:].copy()
    return out


def sample(sd, prompts: list[str], seed: int, s: Settings):
    return run.generation(sd, prompts, seed=seed, steps=s.steps, guidance=s.guidance, height=s.size, width=s.size,
                          sampler="ddim", progress=False)[1]


def edit(sd, record: Experiment):
    plan = run.prepare(record, Path(sd.name), model=sd)   # (the path only keeps outputs off it: none here)
    return run.run(sd, plan, progress=False).images


def blend_res(sd, s: Settings) -> int:
    """The blend's maps: the first down/up cross-attention side from 1/16 of the image up (4 at 64 px,
    the baby's own default; a model native to 512 px would take its 16, which has no maps at 64)."""
    sides = sorted({min(x.res) for x in sd.unet.sites(s.size // 8, s.size // 8) if x.is_cross and x.place != "mid"})
    return next((r for r in sides if r >= s.size // 16), sides[-1])


def swap_colour(scene, index: int):
    """The scene with one object's colour swapped: (target caption, old colour, new colour, object)."""
    caption, target, old, new = world.edit(scene, "colour", np.random.default_rng([DATA_SEED, index, 1]))
    which = next(i for i, (a, b) in enumerate(zip(scene.objects, target.objects)) if a != b)
    return caption, old, new, which


# ---- the claims ------------------------------------------------------------------------------

def fidelity(sd, n: int, s: Settings) -> dict:
    """Objects whose colour is there, and named backgrounds that are the image's commonest colour."""
    objects, backgrounds = [], []
    for i, scene in scenes(n):
        masks = world.colour_masks(sample(sd, [scene.caption], i, s)[0])
        objects += [present(masks, t.colour) for t in scene.objects]
        if scene.background_word is not None:
            backgrounds.append(max(masks, key=lambda c: masks[c].sum()) == scene.background)
    return {"objects": spread(objects), "backgrounds": spread(backgrounds)}


def maps(sd, n: int, s: Settings, res: int) -> dict:
    """Share of a word's attention inside its object's mask (found by colour), against its area."""
    inside, share = {"colour": [], "shape": []}, []
    for i, scene in scenes(n):
        store = AttentionStore((("down", "any"), ("up", "any")), res)
        latents = sampler.generate(sd, [scene.caption], i, s.steps, s.guidance, s.size, s.size, edit=store,
                                   progress=False)
        image = viz.to_pil(sampler.decode(sd, latents))[0]
        masks = world.colour_masks(image)
        attention = store.maps(res)[0].numpy()                      # [res, res, 77]
        for t in scene.objects:
            if not present(masks, t.colour):
                continue
            m = masks[t.colour].reshape(res, s.size // res, res, s.size // res).mean(axis=(1, 3))
            share.append(float(m.mean()))
            for kind, word in (("colour", t.colour_word), ("shape", t.shape_word)):
                tokens = align.token_indices(sd.text.tokenizer, scene.caption, word)
                a = attention[..., tokens].sum(-1)
                inside[kind].append(float((a * m).sum() / a.sum()))
    return {"colour": spread(inside["colour"]), "shape": spread(inside["shape"]), "area": spread(share)}


def swap(sd, n: int, s: Settings, blend_too: bool = True) -> dict:
    """IoU of the kept and the swapped object with P2P and alone; PSNR outside the swap with a blend."""
    out = {k: [] for k in ("kept_p2p", "swapped_p2p", "kept_alone", "swapped_alone", "outside_p2p",
                           "outside_blend")}
    for i, scene in scenes(n, objects=2):
        target, old, new, which = swap_colour(scene, i)
        kept = scene.objects[1 - which].colour
        record = Experiment(scene.caption, (target,), "replace", seed=i, steps=s.steps, guidance=s.guidance,
                            height=s.size, width=s.size)
        src, tgt = edit(sd, record)
        alone = sample(sd, [target], i, s)[0]
        ms, mt, ma = (world.colour_masks(x) for x in (src, tgt, alone))
        if not (present(ms, old) and present(ms, kept)):
            continue   # the source itself lacks an object: nothing to keep
        out["kept_p2p"].append(iou(ms[kept], mt[kept]))
        out["swapped_p2p"].append(iou(ms[old], mt[new]))
        out["kept_alone"].append(iou(ms[kept], ma[kept]))
        out["swapped_alone"].append(iou(ms[old], ma[new]))
        outside = ~grow(ms[old] | mt[new], 2)
        out["outside_p2p"].append(psnr(src, tgt, outside))
        if blend_too:
            blended = edit(sd, dataclasses.replace(record, blend=((old,), (new,)), blend_res=blend_res(sd, s)))[1]
            out["outside_blend"].append(psnr(src, blended, ~grow(ms[old] | world.colour_masks(blended)[new], 2)))
    return {k: spread(v) for k, v in out.items()}


def reweight(sd, n: int, s: Settings) -> dict:
    """The colour's pixels as its word is re-weighted over SCALES, and how often that never falls."""
    counts, rising = {c: [] for c in SCALES}, []
    for i, scene in scenes(n, objects=1):
        colour = scene.objects[0].colour
        seen = []
        for c in SCALES:
            record = Experiment(scene.caption, (scene.caption,), "reweight", reweight={colour: c}, seed=i,
                                steps=s.steps, guidance=s.guidance, height=s.size, width=s.size)
            seen.append(int(world.colour_masks(edit(sd, record)[1])[colour].sum()))
        for c, v in zip(SCALES, seen):
            counts[c].append(v)
        rising.append(all(b >= a for a, b in zip(seen, seen[1:])))
    return {**{f"pixels_{c:g}": spread(v) for c, v in counts.items()}, "rising": spread(rising)}


def photos(sd, n: int, s: Settings, methods=METHODS) -> dict:
    """Each world photo (a two-object scene the model never saw) inverted with each method: the
    reconstruction's PSNR; and a colour swap from it, read in the generator's masks."""
    out = {m: {"psnr": [], "swapped": [], "kept": []} for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        for i, scene in scenes(n, objects=2, offset=10_000):
            image, masks = world.render(scene)
            path = Path(tmp) / f"{i}.png"
            image.save(path)
            target, old, new, which = swap_colour(scene, i)
            for m in methods:
                record = Experiment(scene.caption, (target,), "replace", image=str(path), method=m,
                                    steps=s.steps, guidance=s.guidance, height=s.size, width=s.size)
                rec, edited = edit(sd, record)
                out[m]["psnr"].append(psnr(image, rec))
                out[m]["swapped"].append(world.read_colour(edited, masks[which]) == new)
                out[m]["kept"].append(world.read_colour(edited, masks[1 - which]) == scene.objects[1 - which].colour)
    return {m: {k: spread(v) for k, v in d.items()} for m, d in out.items()}


CLAIMS = {"fidelity": fidelity, "maps": maps, "swap": swap, "reweight": reweight, "photos": photos}


def measure(sd, seeds: int, s: Settings = Settings(), which=tuple(CLAIMS), res: int | None = None) -> dict:
    res = res or max(r for r in {min(x.res) for x in sd.unet.sites(s.size // 8, s.size // 8) if x.is_cross})
    results = {}
    for name in which:
        print(f"claims: {name} ...", file=sys.stderr, flush=True)
        if name == "maps":
            results[name] = maps(sd, seeds, s, res)
        elif name == "photos":
            results[name] = photos(sd, max(2, seeds // 4), s)
        else:
            results[name] = CLAIMS[name](sd, seeds, s)
    return results


def cell(d: dict, percent: bool = False, unit: str = "") -> str:
    if percent:
        return f"{100 * d['mean']:.0f}% ± {100 * d['sd']:.0f} (n={d['n']})"
    return f"{d['mean']:.3g}{unit} ± {d['sd']:.2g} (n={d['n']})"


def table(r: dict) -> str:
    rows = []
    if "fidelity" in r:
        f = r["fidelity"]
        rows += [("text fidelity", "objects whose colour is in the image", cell(f["objects"], True)),
                 ("", "named backgrounds that are the commonest colour", cell(f["backgrounds"], True))]
    if "maps" in r:
        m = r["maps"]
        rows += [("maps localise words", "colour word's attention inside its object", cell(m["colour"], True)),
                 ("", "shape word's attention inside its object", cell(m["shape"], True)),
                 ("", "the object's share of the image (an even map)", cell(m["area"], True))]
    if "swap" in r:
        w = r["swap"]
        ratio = lambda a, b: w[a]["mean"] / w[b]["mean"] if w[b]["mean"] else math.nan  # noqa: E731
        rows += [("word swap keeps layout", "IoU of the kept object, P2P", cell(w["kept_p2p"])),
                 ("", "IoU of the kept object, target alone", cell(w["kept_alone"])),
                 ("", "IoU of the swapped object, P2P", cell(w["swapped_p2p"])),
                 ("", "IoU of the swapped object, target alone", cell(w["swapped_alone"])),
                 ("", "ratio P2P / alone: kept, swapped",
                  f"{ratio('kept_p2p', 'kept_alone'):.2f}, {ratio('swapped_p2p', 'swapped_alone'):.2f}")]
        if w["outside_blend"]["n"]:
            rows += [("local blend keeps the rest", "PSNR outside the swapped object, P2P", cell(w["outside_p2p"], unit=" dB")),
                     ("", "PSNR outside the swapped object, P2P + local blend", cell(w["outside_blend"], unit=" dB"))]
    if "reweight" in r:
        w = r["reweight"]
        rows += [("re-weighting" if c == SCALES[0] else "", f"colour pixels at scale {c:g}", cell(w[f"pixels_{c:g}"]))
                 for c in SCALES]
        rows += [("", "seeds where the count never falls", cell(w["rising"], True))]
    if "photos" in r:
        for m, d in r["photos"].items():
            rows += [(f"photos: {m}", "reconstruction PSNR", cell(d["psnr"], unit=" dB")),
                     ("", "swapped object reads the new colour", cell(d["swapped"], True)),
                     ("", "the other keeps its colour", cell(d["kept"], True))]
    lines = ["| claim | measure | mean ± sd |", "| --- | --- | --- |"]
    return "\n".join(lines + [f"| {a} | {b} | {c} |" for a, b, c in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, default=BABY, help="a model of the world (default the baby model)")
    ap.add_argument("--seeds", type=int, default=32, help="seeds per claim (photos: a quarter; default 32)")
    ap.add_argument("--steps", type=int, default=Settings.steps)
    ap.add_argument("--guidance", type=float, default=Settings.guidance)
    ap.add_argument("--only", nargs="+", choices=list(CLAIMS), default=list(CLAIMS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    try:
        if args.seeds < 1 or args.steps < 1 or not math.isfinite(args.guidance):
            raise InputError("--seeds and --steps at least 1, --guidance finite")
        if args.json is not None and args.json.exists():
            raise InputError(f"{args.json} exists; p2p never overwrites a result")
        sd = run.load(args.weights, args.device)
        s = Settings(args.steps, args.guidance, sd.native_size)
        results = measure(sd, args.seeds, s, args.only)
    except InputError as e:
        print(f"claims: error: {e}", file=sys.stderr)
        return 2
    print(table(results))
    if args.json is not None:
        grid.write_text(args.json, json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
