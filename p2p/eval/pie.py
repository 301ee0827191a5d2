"""`p2p bench pie`: PIE-Bench (Ju et al., 2023, "PnP Inversion"), each photo inverted and edited
by each method under the benchmark's Prompt-to-Prompt protocol, and scored as its authors score.

The data set (its authors distribute it; we do not ship it) is a folder with mapping_file.json
and annotation_images/. Per 12-digit id the mapping holds image_path (under annotation_images/),
original_prompt and editing_prompt (words in [ ] mark the difference; the brackets are
stripped), editing_instruction, editing_type_id ("0".."9"), blended_word ("SRC TGT" or "") and
mask: run-length pairs [start, length, ...] over the row-major 512 x 512 grid, 1 = edited.

Every (photo, method) pair is one cell, numbered photos outermost; cells are checked, sharded,
appended to results*.jsonl and resumed as a sweep's are (p2p/experiment/grid.py). A cell's files are
cells/KEY.photo.png, KEY.source.png (the reconstruction) and KEY.target0.png (the edit), each with
its whole record as `p2p edit` writes it; the edit's size is the model's native one unless --base
gives it. The tables (table.md) and the contact sheet (sheet.png) are made from the results files alone.
"""
import dataclasses
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from models import InputError

from . import metrics
from ..experiment import grid, output, photo, record, run
from ..experiment.grid import Cell, Job
from .metrics import Nets
from .. import viz
from .memory import PeakMemory
from ..experiment.record import Experiment

SIZE = 512                                     # PIE-Bench's photos and masks are 512 x 512
TYPES = ("random", "change object", "add object", "delete object", "change content", "change pose",
         "change color", "change material", "change background", "change style")
METHODS = {"ddim": "DDIM", "null-text": "Null-text", "negative-prompt": "Negative-prompt", "direct": "Direct"}
KEYS = ("image_path", "original_prompt", "editing_prompt", "editing_type_id", "blended_word", "mask")

# PnPInversion's run_editing_p2p.py: refine, cross 0.4, self 0.6 (self-attention up to 32 x 32, as
# the null-text notebook), local blend on the blended words from step 0.2 at threshold 0.3, the
# target's blended word re-weighted x2, 50 DDIM steps, guidance 7.5, at 512 px (SD v1's native size: the
# size is left to the model, as the blend resolution). Our own defaults differ.
# Not followed: its DDIM scheduler has no steps offset (timesteps 980 .. 0), where p2p runs SD's 981 .. 1.
PROTOCOL = {"mode": "refine", "cross_steps": 0.4, "self_steps": 0.6, "self_max_tokens": 1024,
            "blend_threshold": 0.3, "steps": 50, "guidance": 7.5, "inner_steps": 10, "sampler": "ddim"}

# the table's columns, in the PnPInversion paper's order: (result key, heading with the better direction, scale)
COLUMNS = (("structure", "Structure distance ×10³ ↓", 1e3), ("psnr", "PSNR ↑", 1), ("lpips", "LPIPS ×10³ ↓", 1e3),
           ("mse", "MSE ×10⁴ ↓", 1e4), ("ssim", "SSIM ×10² ↑", 1e2), ("clip_whole", "CLIP whole ↑", 1),
           ("clip_edited", "CLIP edited ↑", 1))
BACKGROUND = ("psnr", "lpips", "mse", "ssim")


@dataclass(frozen=True)
class Item:
    id: str
    image: Path
    source: str
    target: str
    instruction: str
    type: int
    blended: tuple[str, str] | None        # (source word, target word)
    mask: tuple[int, ...]                  # run-length pairs


def read(data: Path) -> tuple[list[Item], dict[str, tuple[int | None, str]]]:
    """Every item of DIR/mapping_file.json, and the items that cannot be read, each with its type
    (None where that is what is wrong) and why: one odd item is skipped, not the whole file."""
    path = Path(data) / "mapping_file.json"
    if not path.is_file():
        raise InputError(f"--data {data}: no mapping_file.json there (a PIE-Bench folder holds mapping_file.json "
                         "and annotation_images/)")
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not JSON ({e})") from None
    if not isinstance(mapping, dict) or not mapping:
        raise InputError(f"{path}: a non-empty JSON object of items by id")
    items, bad = [], {}
    for key, entry in mapping.items():
        try:
            items.append(item(Path(data), str(key), entry))
        except InputError as e:
            known = isinstance(entry, dict) and str(entry.get("editing_type_id")) in map(str, range(len(TYPES)))
            bad[str(key)] = (int(entry["editing_type_id"]) if known else None, str(e))
    return items, bad


def item(data: Path, key: str, entry) -> Item:
    """One entry of the mapping, checked."""
    if not isinstance(entry, dict) or (missing := [k for k in KEYS if k not in entry]):
        raise InputError(f"an item has {', '.join(KEYS)}" + (f" (it lacks {missing[0]})" if isinstance(entry, dict)
                                                            else ""))
    if str(entry["editing_type_id"]) not in map(str, range(len(TYPES))):
        raise InputError(f"editing_type_id: 0 to 9, got {entry['editing_type_id']!r}")
    rle = entry["mask"]
    runs = list(zip(rle[::2], rle[1::2])) if isinstance(rle, list) and len(rle) % 2 == 0 else None
    # bools are ints to Python, and a run past the grid would be cut to nothing: neither is a mask
    if runs is None or not all(type(v) is int and v >= 0 for run in runs for v in run):
        raise InputError("mask: run-length pairs [start, length, ...] of non-negative integers")
    if (over := next((r for r in runs if r[0] + r[1] > SIZE * SIZE), None)) is not None:
        raise InputError(f"mask: the run {list(over)} ends past the {SIZE} x {SIZE} grid's {SIZE * SIZE} pixels")
    words = str(entry["blended_word"]).split()
    if len(words) not in (0, 2):
        raise InputError(f"blended_word: 'SOURCE TARGET' or '', got {entry['blended_word']!r}")
    image = data / "annotation_images" / str(entry["image_path"])
    if not image.is_file():
        raise InputError(f"image_path: {image} does not exist")
    strip = lambda text: str(text).replace("[", "").replace("]", "")
    return Item(key, image, strip(entry["original_prompt"]), strip(entry["editing_prompt"]),
                str(entry.get("editing_instruction", "")), int(entry["editing_type_id"]), tuple(words) or None,
                tuple(rle))


def decode_mask(rle, border: bool = True) -> torch.Tensor:
    """The edit region [512, 512], True = edited: each pair (start, length) sets the row-major
    pixels start .. start + length - 1 (cut at the grid's end, as PIE-Bench's decoder does; read
    refuses such a run in the data). PIE-Bench then sets the border
    pixels to 1 "to avoid annotation errors"; `border` follows it, as its scores do."""
    flat = torch.zeros(SIZE * SIZE, dtype=torch.bool)
    for start, length in zip(rle[::2], rle[1::2]):
        flat[start:start + length] = True
    mask = flat.reshape(SIZE, SIZE)
    if border:
        mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    return mask


def protocol(item: Item, method: str, overrides: dict | None = None, where: str | None = None) -> Experiment:
    """The record PnPInversion's P2P protocol edits the item with (`overrides` on top, e.g. steps)."""
    fields = {**PROTOCOL, "source": item.source, "targets": [item.target], "image": str(item.image),
              "method": method}
    if item.blended is not None:
        fields |= {"blend": [[item.blended[0]], [item.blended[1]]], "blend_start": 0.2,
                   "reweight": {item.blended[1]: 2.0}}
    return record.from_json({**fields, **(overrides or {})}, where or f"item {item.id}")


# ---- the metrics, as PIE-Bench's evaluation computes them -------------------------------------

def score(photo, edited, mask: torch.Tensor, target: str, nets: Nets) -> dict[str, float]:
    """PIE-Bench's scores of an edit against its photo ([3, H, W] in [0, 1]; mask [H, W], True =
    edited). The background metrics compare both images times (1 - mask) over the whole image, so
    the masked pixels count as equal zeros (PIE-Bench's definition, not metrics.mse's region);
    they are nan when the mask covers everything. CLIP edited scores the target times the mask."""
    a, b = viz.as_tensor(photo), viz.as_tensor(edited)
    keep = (~mask).double()
    out = {}
    if nets.dino is not None:
        out["structure"] = nets.dino.distance(a, b, pie=True)
    if keep.any():
        out |= {"psnr": metrics.psnr(a * keep, b * keep), "mse": metrics.mse(a * keep, b * keep),
                "ssim": metrics.ssim(a * keep, b * keep)}
        if nets.lpips is not None:
            out["lpips"] = nets.lpips.distance(a * keep, b * keep)
    else:
        out |= {k: math.nan for k in BACKGROUND if k != "lpips" or nets.lpips is not None}
    if nets.clip is not None:
        out["clip_whole"] = nets.clip.score(b, target)
        out["clip_edited"] = nets.clip.score(b * mask, target) if mask.any() else math.nan
    return out


# ---- running ----------------------------------------------------------------------------------

# what each item sets from its own entry, or --methods: --base cannot set it for all
ITEM_FIELDS = {"source": "original_prompt", "targets": "editing_prompt", "image": "image_path",
               "inversion": "image_path", "blend": "blended_word", "reweight": "blended_word", "method": "--methods"}


def check_overrides(overrides: dict, methods: list[str], architecture):
    """What --base changes for every photo, checked once on a stand-in item (with and without a
    blended word, the size the model's where --base leaves it), so a bad value is refused, not
    found wrong in every photo and skipped 700 times."""
    for name in overrides:
        if name in ITEM_FIELDS:
            raise InputError(f"--base {name}: each photo's {ITEM_FIELDS[name]} sets it"
                             + (", give --methods" if name == "method" else ""))
    for method in methods:
        for blended in (None, ("cat", "dog")):
            r = protocol(Item("", Path("photo.png"), "a cat", "a dog", "", 0, blended, ()), method, overrides, "--base")
            size = run.defaults(architecture, r.height, r.width)
            height, width = size["height"], size["width"]
            if height != width:
                raise InputError(f"--base: photos are edited square, got width {width} and height {height}")
            photo.check_settings(method, r.steps, height)


def cells(items: list[Item], methods: list[str], overrides: dict | None, job: Job) -> tuple[list[Cell], dict]:
    """Every (item, method) cell, checked without the model, and the items skipped with why (a
    blended word missing from its prompt, where PnPInversion's code blends with an empty map)."""
    architecture = job.architecture()     # once: its headers are read for it
    check_overrides(overrides or {}, methods, architecture)
    every, skipped = [], {}
    for item in items:
        try:
            records = [protocol(item, m, overrides) for m in methods]
        except InputError as e:
            skipped[item.id] = str(e)
            continue
        every += [Cell(len(every) + j, item.id, (("method", m),), r) for j, (m, r) in enumerate(zip(methods, records))]
    for cell, e in grid.refusals(every, job.weights, architecture):
        skipped.setdefault(cell.case, str(e))
    kept = [c for c in every if c.case not in skipped]          # numbered again, so the shards stay even
    return ([dataclasses.replace(c, index=i) for i, c in enumerate(kept)],
            {item.id: skipped[item.id] for item in items if item.id in skipped})


def mask_at(item: Item, size: int) -> torch.Tensor:
    """The item's mask at the edit's size (nearest), PIE-Bench's border included."""
    mask = decode_mask(item.mask)
    if size == SIZE:
        return mask
    return torch.nn.functional.interpolate(mask[None, None].float(), size=(size, size))[0, 0] > 0.5


def run_cell(sd, cell: Cell, item: Item, job: Job, nets: Nets) -> dict:
    """Invert and edit one photo with one method, save photo, reconstruction and edit (each with
    the record, as `p2p edit` writes them), score them."""
    # no cache_dir: the inversion is not kept (a null-text inversion is 12 MB, and there are 700 photos)
    outputs = run.Outputs(tiles=job.out / "cells" / cell.key, software="p2p bench pie")
    plan = run.prepare(cell.record, job.weights, outputs, model=sd)
    start = time.perf_counter()
    with PeakMemory(sd.device) as memory:
        result = run.run(sd, plan)
    seconds = time.perf_counter() - start
    run.write(result, plan.outputs)
    r = plan.record
    names = {"photo": grid.tile(cell, "photo"), "reconstruction": grid.tile(cell, "source"),
             "edit": grid.tile(cell, "target0")}
    edited = metrics.load_png(job.out / names["edit"])
    scores = score(metrics.load_png(job.out / names["photo"]), edited, mask_at(item, r.height), r.targets[0], nets)
    return {"key": cell.key, "index": cell.index, "id": item.id, "type": item.type, "method": r.method,
            "record": r.to_json(), "images": names, "metrics": scores, "seconds": seconds, "peak_mib": memory.mib}


def select(items: list[Item], bad: dict, types: list[int] | None, limit: int | None) -> tuple[list[Item], dict]:
    """The items of the chosen types, the first `limit` of each type (in id order), and the
    unreadable items ({id: (type, why)} from read) of those types (or of no type), by id: why."""
    chosen, count = [], {}
    for item in sorted(items, key=lambda i: i.id):
        if types is not None and item.type not in types:
            continue
        count[item.type] = count.get(item.type, 0) + 1
        if limit is None or count[item.type] <= limit:
            chosen.append(item)
    skipped = {k: why for k, (t, why) in sorted(bad.items()) if types is None or t is None or t in types}
    if not chosen and not skipped:
        raise InputError(f"no PIE-Bench item of type {', '.join(map(str, types or []))} in the data")
    return chosen, skipped


def plan(data: Path, types, limit, methods, overrides, job: Job) -> tuple[list, list, dict]:
    """The chosen items, their cells and the items skipped (by id: why); refused when no cell is left."""
    read_items, bad = read(data)
    items, skipped = select(read_items, bad, types, limit)
    every, unusable = cells(items, methods, overrides, job)
    skipped |= unusable
    if not every:
        first = next(iter(skipped.items()))
        raise InputError(f"no photo left to edit: all {len(skipped)} skipped ({first[0]}: {first[1]}"
                         + (", ..." if len(skipped) > 1 else "") + ")")
    return items, every, skipped


def bench(data: Path, job: Job, methods: list[str], types: list[int] | None = None, limit: int | None = None,
          overrides: dict | None = None) -> Path:
    """Check every cell, run this shard's unfinished ones, then write table.md and sheet.png from
    every shard's results; returns the table's path."""
    items, every, skipped = plan(data, types, limit, methods, overrides, job)
    by_id = {item.id: item for item in items}
    what = (f"pie: {len({c.case for c in every})} photos x {len(methods)} methods ({len(skipped)} photos skipped), "
            f"{len(every)} cells")
    grid.run_cells(every, job, what, lambda sd, cell, nets: run_cell(sd, cell, by_id[cell.case], job, nets),
                   lambda: Nets.load(job.clip, job.dino, job.lpips))
    return report(every, skipped, methods, job.out)


# ---- the tables and the sheet ----------------------------------------------------------------

def table(rows: list[dict], methods: list[str]) -> list[str]:
    """Markdown: one line per method, the mean of each metric over the rows (nan excluded)."""
    names = [c for c in COLUMNS if any(c[0] in r["metrics"] for r in rows)]
    lines = ["| " + " | ".join(["method", *(c[1] for c in names), "s / photo", "peak MiB", "photos"]) + " |",
             "| " + " | ".join(["---"] * (4 + len(names))) + " |"]
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        if not mine:
            continue
        cols = [grid.figure([r["metrics"].get(key, math.nan) for r in mine], scale, spread=False)
                for key, _, scale in names]
        seconds, peak = statistics.fmean(r["seconds"] for r in mine), max(r["peak_mib"] for r in mine)
        lines.append("| " + " | ".join([f"{METHODS[m]} + P2P", *cols, f"{seconds:.1f}", f"{peak:.0f}", str(len(mine))])
                     + " |")
    return lines


def report(every: list[Cell], skipped: dict, methods: list[str], out: Path) -> Path:
    """table.md (the PnPInversion paper's layout, then one table per editing type) and sheet.png,
    each named as written; returns the table's path."""
    if not out.is_dir():
        raise InputError(f"--out {out}: no such folder (the tables are made from a run's results there)")
    done = grid.read_results(out)
    rows = [done[c.key] for c in every if c.key in done]
    undefined = {m: sum(math.isnan(r["metrics"].get("mse", 0.0)) for r in rows if r["method"] == m) for m in methods}
    photos = {c.case: 0 for c in every}
    for r in rows:
        photos[r["id"]] += 1
    whole, part = sum(n == len(methods) for n in photos.values()), sum(0 < n < len(methods) for n in photos.values())
    lines = [f"# PIE-Bench\n\n{whole} of {len(photos)} photos done" + (f" ({part} more in part)" if part else "")
             + f" by {', '.join(methods)}" + (f"; {len(skipped)} photos skipped (below)" if skipped else "")
             + ". Means over photos; structure distance on the whole image, PSNR, LPIPS, "
             "MSE and SSIM on the unedited part (both images times 1 - mask), CLIP similarity of the whole "
             "edit and of its edited part with the target prompt. s / photo: inversion and edit; peak MiB: "
             "above the loaded model.\n", *table(rows, methods)]
    if any(undefined.values()):
        lines.append("\nExcluded from the background columns (the mask covers the whole image): "
                     + ", ".join(f"{METHODS[m]} {n}" for m, n in undefined.items() if n) + ".")
    if skipped:
        lines.append(f"\n{len(skipped)} photos skipped before sampling: "
                     + "; ".join(f"{k}: {why}" for k, why in skipped.items()))
    for t, name in enumerate(TYPES):
        mine = [r for r in rows if r["type"] == t]
        if mine:
            lines += [f"\n## {t}. {name} ({len({r['id'] for r in mine})} photos)\n", *table(mine, methods)]
    grid.write_text(out / "table.md", "\n".join(lines) + "\n")
    written = [out / "table.md", *([sheet(rows, methods, out)] if rows else [])]
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return out / "table.md"


def sheet(rows: list[dict], methods: list[str], out: Path, per_type: int = 2, tile: int = 160) -> Path:
    """sheet.png: per editing type its first photos, each a row: its type, the photo (under it
    its prompt), then each method's reconstruction (the edit's source row) and edit (under it the
    target prompt)."""
    def image(name):
        with Image.open(out / name) as im:
            return im.convert("RGB").resize((tile, tile), Image.Resampling.LANCZOS)

    by_id = {}
    for r in rows:
        by_id.setdefault(r["id"], {})[r["method"]] = r
    lines, shown = [], {}
    for id_, mine in sorted(by_id.items()):
        first = next(iter(mine.values()))
        t = first["type"]
        if shown.setdefault(t, 0) == per_type:
            continue
        shown[t] += 1
        source, target = first["record"]["source"], first["record"]["targets"][0]
        tiles = [viz.text_tile(f"{t}. {TYPES[t]} ({id_})", (tile, tile)), image(first["images"]["photo"])]
        labels = ["", source]
        for m in methods:
            if m in mine:
                tiles += [image(mine[m]["images"]["reconstruction"]), image(mine[m]["images"]["edit"])]
            else:
                tiles += [Image.new("RGB", (tile, tile), (200, 200, 200))] * 2
            labels += [f"{METHODS[m]}: reconstruction", f"{METHODS[m]}: {target}"]
        lines.append(viz.labelled_row(tiles, labels))
    output.save_image(out / "sheet.png", viz.stack(lines), {"software": "p2p bench pie"})
    return out / "sheet.png"
