"""`p2p sweep`: one experiment record per cell of a grid (or zip) of axes over cases, resumable.

A spec is JSON:

    {"base":  {record fields every cell shares},
     "cases": [{"name": "cat", record fields: prompts, mode, words...}, ...],
     "axes":  {"cross_sites": ["any@0", "any@1"], "seed": [0, 1]},
     "combine": "grid",                       (or "zip": the axes' i-th values together)
     "region": "blend"}                       (or "attention", "none": the edit region of the metrics)

Each cell is record = base | case | one value per axis, checked before anything samples or DIR is
made (a bad entry is one error naming its path, "spec.cases[1].blend"; no two cells alike).
Cells are numbered in a fixed order (cases outermost, then the axes as written); process K of N
takes the cells i with i % N == K and appends each finished one, whole record and metrics, as a
line of DIR/results.jsonl (DIR/results.K-of-N.jsonl for a shard), holding its shard's lock
(p2p/experiment/grid.py). A rerun skips the cells any results file holds.
Each cell's images are DIR/cells/KEY.source.png, KEY.target{i}.png (KEY.photo.png for a photo
case), each carrying its whole record as `p2p edit` writes it (`p2p edit --recipe` re-runs it), and
the edit regions KEY.target{i}.region.png; fields the record leaves to the model (height, width,
blend_res, self_max_tokens) take the model's native values. The tables (results.csv, summary.md)
and the contact sheets (sheet-AXIS.png) are made from all results files and the images under
DIR/cells, never kept apart from them.

Metrics (p2p/eval/metrics.py) compare each target with its cell's source, read back from the saved
PNGs: background MSE, PSNR, SSIM outside the edit region and locality inside it (the region:
the blend's final mask or drawn blend_mask; the edited words' attention, see metrics.attention_masks;
or none), and with their weights the CLIP score and direction and DINO structure distance.
"""
import csv
import io
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch.nn.functional as F
from PIL import Image

from models import InputError

from .. import viz
from ..experiment import grid, output, record, run
from ..experiment.grid import Cell, Job
from ..experiment.record import Experiment
from . import metrics
from .metrics import Nets

METRICS = ("mse", "psnr", "ssim", "locality", "clip_score", "clip_direction", "structure")
REGIONS = ("blend", "attention", "none")
SPEC_KEYS = ("base", "cases", "axes", "combine", "region", "region_threshold", "about")
MAX_CELLS = 100_000       # checking a cell takes a few ms: 100k take minutes, and would take weeks to sample


# ---- the spec ---------------------------------------------------------------------------

def read_spec(path: Path) -> dict:
    if not Path(path).is_file():
        raise InputError(f"sweep spec {path} does not exist")
    try:
        spec = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"sweep spec {path}: not JSON ({e})") from None
    if not isinstance(spec, dict):
        raise InputError(f"sweep spec {path}: a JSON object with base, cases and axes")
    return spec


def shape(spec: dict) -> tuple[dict, list, dict, int]:
    """The spec's base, cases and axes, checked as a whole (not cell by cell), and its cell count."""
    unknown = [k for k in spec if k not in SPEC_KEYS]
    if unknown:
        raise InputError(f"spec: unknown entry {unknown[0]!r} (a spec has {', '.join(SPEC_KEYS)})")
    if spec.get("region", "blend") not in REGIONS:
        raise InputError(f"spec.region: one of {', '.join(REGIONS)}, got {spec['region']!r}")
    try:
        record.fraction(spec.get("region_threshold", 0.3))
    except ValueError as e:
        raise InputError(f"spec.region_threshold: {e}") from None
    base, cases, axes = spec.get("base", {}), spec.get("cases"), spec.get("axes", {})
    if not isinstance(base, dict) or not isinstance(axes, dict):
        raise InputError("spec: base and axes are JSON objects")
    if not isinstance(cases, list) or not cases:
        raise InputError("spec.cases: a non-empty list of cases")
    for name, values in axes.items():
        if name not in record.FIELDS:
            raise InputError(f"spec.axes: unknown field {name!r}")
        if not isinstance(values, list) or not values:
            raise InputError(f"spec.axes.{name}: a non-empty list of values")
    return base, cases, axes, len(cases) * combinations(spec, axes)


def combinations(spec: dict, axes: dict) -> int:
    """How many cells each case has: the product of the axes' lengths (grid), or their one length (zip)."""
    combine = spec.get("combine", "grid")
    if combine == "zip":
        if len({len(v) for v in axes.values()}) > 1:
            raise InputError(f"spec: zipped axes need as many values each, got "
                             f"{', '.join(f'{k} {len(v)}' for k, v in axes.items())}")
        return len(next(iter(axes.values()))) if axes else 1
    if combine == "grid":
        return math.prod(len(v) for v in axes.values())
    raise InputError(f"spec.combine: grid or zip, got {combine!r}")


def check_count(count: int, cases: list):
    if count > MAX_CELLS:
        raise InputError(f"spec: {count:,} cells ({len(cases)} cases x {count // len(cases):,} combinations of the "
                         f"axes), more than a sweep takes ({MAX_CELLS:,}): split it into several specs")


def check_overrides(overrides: dict, cases: list, axes: dict):
    """What --base would set and a cell would then overwrite: refused, not ignored."""
    for name in overrides:
        if name in axes:
            raise InputError(f"--base {name}: {name} is an axis of the spec (spec.axes.{name}), which sets it per cell")
        case = next((i for i, c in enumerate(cases) if isinstance(c, dict) and name in c), None)
        if case is not None:
            raise InputError(f"--base {name}: spec.cases[{case}] sets {name}, and a case's own fields come first")


def check_axes(axes: dict, grid_of_them: bool):
    """Each axis value as its field checks it, and (in a grid) none twice, in any spelling."""
    for name, values in axes.items():
        seen = {}
        for j, value in enumerate(values):
            try:
                canonical = json.dumps(record.FIELDS[name].metadata["check"](value))
            except ValueError as e:
                raise InputError(f"spec.axes.{name}[{j}]: {e}") from None
            if canonical in seen and grid_of_them:
                raise InputError(f"spec.axes.{name}[{j}]: {value_text(value)} again (as [{seen[canonical]}]): "
                                 "each cell would run twice")
            seen.setdefault(canonical, j)


def case_cells(i: int, case, names: set, base: dict, axes: dict, combos: list, start: int) -> list[Cell]:
    """The cells of spec.cases[i] (its name not among `names`), numbered from `start`."""
    where = f"spec.cases[{i}]"
    if not isinstance(case, dict) or not isinstance(case.get("name"), str):
        raise InputError(f"{where}: a case is an object with a name and record fields")
    if case["name"] in names:
        raise InputError(f"{where}: a second case named {case['name']!r}")
    fields = {k: v for k, v in case.items() if k != "name"}
    record.check_values(fields, where)
    out = []
    for combo in combos:
        values = dict(zip(axes, combo))
        r = record.from_json({**base, **fields, **values}, where)
        out.append(Cell(start + len(out), case["name"], tuple(values.items()), r))
    return out


def check_new(cell: Cell, every: list[Cell], keys: dict, where: str):
    """Refuse a cell that is the same experiment as an earlier one."""
    if cell.key in keys:
        first = every[keys[cell.key]]
        raise InputError(f"{where} ({cell.case}, cell {cell.index}): the same experiment as cell {first.index} "
                         f"({first.case}{''.join(f', {a} {value_text(v)}' for a, v in first.axes)}); "
                         "it would run twice")
    keys[cell.key] = cell.index


def cells(spec: dict, overrides: dict | None = None) -> list[Cell]:
    """Every cell of the spec, each record checked (with `overrides` on top of the base), no two
    the same experiment."""
    base, cases, axes, count = shape(spec)
    check_count(count, cases)
    overrides = overrides or {}
    record.check_values(base, "spec.base")
    check_overrides(overrides, cases, axes)
    check_axes(axes, spec.get("combine", "grid") == "grid")
    zipped = spec.get("combine") == "zip" and axes
    combos = list(zip(*axes.values())) if zipped else list(itertools.product(*axes.values()))
    every, names, keys = [], set(), {}
    for i, case in enumerate(cases):
        for cell in case_cells(i, case, names, {**base, **overrides}, axes, combos, len(every)):
            check_new(cell, every, keys, f"spec.cases[{i}]")
            every.append(cell)
        names.add(case["name"])
    return every


# ---- a cell -----------------------------------------------------------------------------

def cell_metrics(out: Path, images: dict, r: Experiment, nets: Nets = Nets()) -> list[dict]:
    """The metrics of each target of a cell, from its saved images (as a rerun of them would)."""
    source = metrics.load_png(out / images["source"])
    rows = []
    for target_text, target, region in zip(r.targets, images["targets"], images["regions"]):
        mask = metrics.load_png(out / region)[0] > 0.5 if region else None
        edited = metrics.load_png(out / target)
        row = metrics.pixel_metrics(source, edited, mask)
        if nets.clip is not None:
            row |= nets.clip.measure(source, edited, r.source, target_text)
        if nets.dino is not None:
            row["structure"] = nets.dino.distance(source, edited)
        rows.append(row)
    return rows


def edit_regions(result: run.Result, region: str, threshold: float) -> list:
    """Each target's edit region [H, W] (True = edited) as the spec's region names it, or None."""
    targets = len(result.record.targets)
    blend = result.edit.blend
    if region == "attention":
        return metrics.attention_masks(result, threshold)
    if region == "blend" and blend is not None and blend.last_mask is not None:
        size = result.images[0].size[::-1]
        return [F.interpolate(blend.last_mask[1 + i][None].float(), size=size)[0, 0] > 0.5 for i in range(targets)]
    return [None] * targets


def run_cell(sd, cell: Cell, job: Job, nets: Nets = Nets(), region: str = "blend", threshold: float = 0.3) -> dict:
    """Sample one cell, save its images (each with the record, as `p2p edit` writes them) and its edit
    regions, and measure them."""
    outputs = run.Outputs(tiles=job.out / "cells" / cell.key, software="p2p sweep")
    plan = run.prepare(cell.record, job.weights, outputs, model=sd, cache_dir=job.out / "inversions",
                       store=region == "attention")
    result = run.run(sd, plan)
    run.write(result, plan.outputs)
    targets = range(len(cell.record.targets))
    names = {"source": grid.tile(cell, "source"), "targets": [grid.tile(cell, f"target{i}") for i in targets],
             "regions": []}
    if result.photo is not None:                 # a photo case: the source row is its reconstruction
        names["photo"] = grid.tile(cell, "photo")
    for i, mask in zip(targets, edit_regions(result, region, threshold)):
        names["regions"].append(None if mask is None else grid.tile(cell, f"target{i}.region"))
        if mask is not None:
            image = Image.fromarray(mask.numpy().astype(np.uint8) * 255)
            output.save_image(job.out / names["regions"][-1], image, result.metadata)
    return {"key": cell.key, "index": cell.index, "case": cell.case, "axes": dict(cell.axes),
            "record": plan.record.to_json(), "images": names,
            "metrics": cell_metrics(job.out, names, plan.record, nets)}


# ---- tables and sheets ------------------------------------------------------------------

def value_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def report(spec: dict, every: list[Cell], out: Path):
    """results.csv (one row per cell and target), summary.md (per axis: mean ± sd over cases,
    seeds and the other axes) and sheet-AXIS.png, from the results files alone; each named as written."""
    if not out.is_dir():
        raise InputError(f"--out {out}: no such folder (the tables are made from a sweep's results there)")
    done = grid.read_results(out)
    rows = [(c, done[c.key]) for c in every if c.key in done]
    axes = list(spec.get("axes", {}))
    names = [m for m in METRICS if any(m in t for _, r in rows for t in r["metrics"])]
    table = io.StringIO()
    w = csv.writer(table)
    w.writerow(["key", "case", *axes, "target", *names])
    for c, r in rows:
        for t, m in enumerate(r["metrics"]):
            w.writerow([c.key, c.case, *(value_text(r["axes"][a]) for a in axes), t,
                        *(f"{m[x]:.6g}" if x in m else "" for x in names)])
    grid.write_text(out / "results.csv", table.getvalue())
    lines = [f"# Sweep summary\n\n{len(rows)} of {len(every)} cells done; each figure is the mean ± sd over "
             "cases, seeds, targets and the other axes.\n"]
    for axis in axes:
        lines += [f"\n## {axis}\n", "| " + " | ".join([axis, "cells", *names]) + " |",
                  "| " + " | ".join(["---"] * (2 + len(names))) + " |"]
        for value in spec["axes"][axis]:
            picked = [r for _, r in rows if r["axes"][axis] == value]
            per = {x: [t[x] for r in picked for t in r["metrics"] if x in t] for x in names}
            lines.append("| " + " | ".join([value_text(value), str(len(picked)), *(grid.figure(per[x]) for x in names)])
                         + " |")
    grid.write_text(out / "summary.md", "\n".join(lines) + "\n")
    written = [out / "results.csv", out / "summary.md", *(sheet(spec, every, done, axis, out) for axis in axes)]
    for path in written:
        print(f"wrote {path}", file=sys.stderr)


# what the source row's pixels depend on: the edit changes only the targets
SOURCE_FIELDS = ("source", "seed", "steps", "guidance", "sampler", "height", "width", "image", "inversion", "method",
                 "inner_steps", "offsets")


def sheet(spec: dict, every: list[Cell], done: dict, axis: str, out: Path) -> Path:
    """Rows: the source (under the photo, for photo cases), then one row per value of `axis`, with
    the source again before a value that changes it (a seed does); columns: the cases. The other
    axes stay at their first values; a cell not run yet is a grey tile."""
    firsts = {a: v[0] for a, v in spec["axes"].items()}
    cases = list(dict.fromkeys(c.case for c in every))
    index = {(c.case, json.dumps(c.axes)): c for c in every}
    photos = any(c.record.image for c in every)

    def tile(cell, name):
        row = done.get(cell.key) if cell is not None else None
        if row is None:
            return None
        path = row["images"]["targets"][0] if name == "target" else row["images"].get(name)
        if path is None:                           # no photo: the case samples its source (or ran before
            return None if cell.record.image else "generated"   # photos were kept: grey)
        with Image.open(out / path) as im:
            return im.convert("RGB")

    lines, last = [], None                          # (title, tiles), the source fields shown last
    for value in spec["axes"][axis]:
        picked = [index.get((case, json.dumps(tuple({**firsts, axis: value}.items())))) for case in cases]
        sources = [c and json.dumps([getattr(c.record, f) for f in SOURCE_FIELDS]) for c in picked]
        if sources != last:
            at = "" if last is None else f", {axis} = {value_text(value)}"
            if photos:
                lines.append((f"photo{at}", [tile(c, "photo") for c in picked]))
            lines.append((f"source{at}", [tile(c, "source") for c in picked]))
            last = sources
        lines.append((f"{axis} = {value_text(value)}", [tile(c, "target") for c in picked]))
    size = next((t.size for _, tiles in lines for t in tiles if isinstance(t, Image.Image)), (128, 128))
    grey = Image.new("RGB", size, (200, 200, 200))
    rows = []
    for i, (title, tiles) in enumerate(lines):
        tiles = [viz.text_tile(title, size), *(viz.text_tile(t, size) if isinstance(t, str) else t or grey
                                                  for t in tiles)]
        rows.append(viz.labelled_row(tiles, ["", *(cases if i == 0 else [""] * len(cases))]))
    path = out / f"sheet-{axis}.png"
    output.save_image(path, viz.stack(rows), {"software": "p2p sweep", "axis": axis})
    return path


# ---- the sweep ---------------------------------------------------------------------------

def sweep(spec: dict, job: Job, overrides: dict | None = None) -> list[Cell]:
    """Check every cell, run this shard's unfinished ones (CLIP and DINO from the job's folders,
    skipped with a note where absent), then write the tables and sheets from every shard's results
    so far."""
    count = shape(spec)[3]
    if 1000 <= count <= MAX_CELLS:       # building and checking them takes a while: say how many first
        print(f"sweep: checking {count:,} cells", file=sys.stderr)
    every = cells(spec, overrides)
    position = {case["name"]: i for i, case in enumerate(spec["cases"])}
    for cell, e in grid.refusals(every, job.weights, job.architecture()):
        raise InputError(f"spec.cases[{position[cell.case]}] ({cell.case}, cell {cell.index}): {e}")
    region, threshold = spec.get("region", "blend"), spec.get("region_threshold", 0.3)
    grid.run_cells(every, job, f"sweep: {len(every)} cells",
                   lambda sd, cell, nets: run_cell(sd, cell, job, nets, region, threshold),
                   lambda: Nets.load(job.clip, job.dino), inversions=any(c.record.image for c in every))
    report(spec, every, job.out)
    return every
