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
The tables (results.csv, summary.md) and the contact sheets (sheet-AXIS.png) are made from
all results files and the images under DIR/cells, never kept apart from them.

Metrics (p2p/eval/metrics.py) compare each target with its cell's source, read back from the saved
PNGs: background MSE, PSNR, SSIM outside the edit region and locality inside it (the region:
the blend's final mask or drawn blend_mask; the edited words' attention, see metrics.attention_masks;
or none), and with their weights the CLIP score and direction and DINO structure distance.
"""
import csv
import hashlib
import io
import itertools
import json
import math
import statistics
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from models import InputError
from models.checkpoint import load

from ..eval import metrics
from . import output, record, run
from .. import viz
from .grid import append, hold, make_folder, read_results, results_file, write_text
from .record import Experiment

METRICS = ("mse", "psnr", "ssim", "locality", "clip_score", "clip_direction", "structure")
REGIONS = ("blend", "attention", "none")
SPEC_KEYS = ("base", "cases", "axes", "combine", "region", "region_threshold", "about")
MAX_CELLS = 100_000       # checking a cell takes a few ms: 100k take minutes, and would take weeks to sample


@dataclass(frozen=True)
class Cell:
    index: int
    case_index: int                           # where its case is in spec.cases
    case: str
    axes: tuple[tuple[str, object], ...]      # (field, JSON value) in the spec's order
    record: Experiment

    @cached_property
    def key(self) -> str:
        """16 hex digits naming the cell by its record alone, so a changed spec never reuses a result."""
        return hashlib.sha256(json.dumps(self.record.to_json(), sort_keys=True).encode()).hexdigest()[:16]


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
    combine = spec.get("combine", "grid")
    if combine == "zip":
        if len({len(v) for v in axes.values()}) > 1:
            raise InputError(f"spec: zipped axes need as many values each, got "
                             f"{', '.join(f'{k} {len(v)}' for k, v in axes.items())}")
        combos = len(next(iter(axes.values()))) if axes else 1
    elif combine == "grid":
        combos = math.prod(len(v) for v in axes.values())
    else:
        raise InputError(f"spec.combine: grid or zip, got {combine!r}")
    return base, cases, axes, len(cases) * combos


def cells(spec: dict, overrides: dict | None = None) -> list[Cell]:
    """Every cell of the spec, each record checked (with `overrides` on top of the base), no two
    the same experiment."""
    base, cases, axes, count = shape(spec)
    if count > MAX_CELLS:
        raise InputError(f"spec: {count:,} cells ({len(cases)} cases x {count // len(cases):,} combinations of the "
                         f"axes), more than a sweep takes ({MAX_CELLS:,}): split it into several specs")
    overrides = overrides or {}
    record.check_values(base, "spec.base")
    for name in overrides:       # what --base would set and a cell would then overwrite: refused, not ignored
        if name in axes:
            raise InputError(f"--base {name}: {name} is an axis of the spec (spec.axes.{name}), which sets it per cell")
        case = next((i for i, c in enumerate(cases) if isinstance(c, dict) and name in c), None)
        if case is not None:
            raise InputError(f"--base {name}: spec.cases[{case}] sets {name}, and a case's own fields come first")
    for name, values in axes.items():
        seen = {}
        for j, value in enumerate(values):
            try:
                canonical = json.dumps(record.FIELDS[name].metadata["check"](value))
            except ValueError as e:
                raise InputError(f"spec.axes.{name}[{j}]: {e}") from None
            if canonical in seen and spec.get("combine", "grid") == "grid":
                raise InputError(f"spec.axes.{name}[{j}]: {value_text(value)} again (as [{seen[canonical]}]): "
                                 "each cell would run twice")
            seen.setdefault(canonical, j)
    zipped = spec.get("combine") == "zip" and axes
    combos = list(zip(*axes.values())) if zipped else list(itertools.product(*axes.values()))
    out, names, keys = [], set(), {}
    for i, case in enumerate(cases):
        where = f"spec.cases[{i}]"
        if not isinstance(case, dict) or not isinstance(case.get("name"), str):
            raise InputError(f"{where}: a case is an object with a name and record fields")
        if case["name"] in names:
            raise InputError(f"{where}: a second case named {case['name']!r}")
        names.add(case["name"])
        fields = {k: v for k, v in case.items() if k != "name"}
        record.check_values(fields, where)
        for combo in combos:
            values = dict(zip(axes, combo))
            r = record.from_json({**base, **overrides, **fields, **values}, where)
            cell = Cell(len(out), i, case["name"], tuple(values.items()), r)
            if cell.key in keys:
                first = out[keys[cell.key]]
                raise InputError(f"{where} ({cell.case}, cell {cell.index}): the same experiment as cell {first.index} "
                                 f"({first.case}{''.join(f', {a} {value_text(v)}' for a, v in first.axes)}); "
                                 "it would run twice")
            keys[cell.key] = cell.index
            out.append(cell)
    return out


# ---- a cell -----------------------------------------------------------------------------

def load_png(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        return metrics.as_tensor(image)


@dataclass
class Nets:
    """The networks of the metrics that need one; None where the weights are absent."""
    clip: metrics.Clip | None = None
    dino: metrics.Dino | None = None


def cell_metrics(out: Path, images: dict, r: Experiment, nets: Nets = Nets()) -> list[dict]:
    """The metrics of each target of a cell, from its saved images (as a rerun of them would)."""
    source = load_png(out / images["source"])
    rows = []
    for target_text, target, region in zip(r.targets, images["targets"], images["regions"]):
        mask = load_png(out / region)[0] > 0.5 if region else None
        edited = load_png(out / target)
        row = metrics.pixel_metrics(source, edited, mask)
        if nets.clip is not None:
            row |= nets.clip.measure(source, edited, r.source, target_text)
        if nets.dino is not None:
            row["structure"] = nets.dino.distance(source, edited)
        rows.append(row)
    return rows


def run_cell(sd, cell: Cell, weights: Path, out: Path, nets: Nets = Nets(), region: str = "blend",
             threshold: float = 0.3) -> dict:
    """Sample one cell, save its images (and its edit regions), and measure them."""
    plan = run.prepare(cell.record, weights, run.Outputs(software="p2p sweep"), model=sd,
                       cache_dir=out / "inversions", store=region == "attention")
    result = run.run(sd, plan)
    blend = plan.edit.blend
    if region == "attention":
        masks = metrics.attention_masks(result, threshold)
    elif region == "blend" and blend is not None and blend.last_mask is not None:
        size = result.images[0].size[::-1]
        masks = [F.interpolate(blend.last_mask[1 + i][None].float(), size=size)[0, 0] > 0.5
                 for i in range(len(cell.record.targets))]
    else:
        masks = [None] * len(cell.record.targets)
    meta = result.metadata
    names = {"source": f"cells/{cell.key}.source.png",
             "targets": [f"cells/{cell.key}.target{i}.png" for i in range(len(cell.record.targets))], "regions": []}
    output.save_image(out / names["source"], result.images[0], meta)
    if result.photo is not None:                 # a photo case: the source row is its reconstruction
        names["photo"] = f"cells/{cell.key}.photo.png"
        output.save_image(out / names["photo"], result.photo, meta)
    for i, (target, mask) in enumerate(zip(names["targets"], masks)):
        output.save_image(out / target, result.images[1 + i], meta)
        names["regions"].append(None if mask is None else f"cells/{cell.key}.target{i}.region.png")
        if mask is not None:
            output.save_image(out / names["regions"][-1], Image.fromarray(mask.numpy().astype(np.uint8) * 255), meta)
    return {"key": cell.key, "index": cell.index, "case": cell.case, "axes": dict(cell.axes),
            "record": cell.record.to_json(), "images": names, "metrics": cell_metrics(out, names, cell.record, nets)}


def check_cells(every: list[Cell], weights: Path, out: Path, prediction: str | None = None):
    """Every cell's words, sizes, photo and layers, before the model loads (its architecture is
    read from the checkpoint's headers). Cells that differ only in their seed are checked once."""
    architecture = load(weights, "meta", prediction=prediction)
    checked = set()
    for cell in tqdm(every, desc="checking cells", file=sys.stderr, disable=len(every) < 1000):
        unseeded = json.dumps({**cell.record.to_json(), "seed": 0}, sort_keys=True)
        if unseeded in checked:
            continue
        try:
            run.prepare(cell.record, weights, model=architecture)   # (out/inversions is made later)
        except InputError as e:
            raise InputError(f"spec.cases[{cell.case_index}] ({cell.case}, cell {cell.index}): {e}") from None
        checked.add(unseeded)


def sweep(spec: dict, weights: Path, out: Path, shard: tuple[int, int] = (0, 1), overrides: dict | None = None,
          load_model=None, clip: Path | None = None, dino: Path | None = None,
          prediction: str | None = None) -> list[Cell]:
    """Run this shard's unfinished cells (the model comes from `load_model()`, only if there are
    any; CLIP and DINO from their folders, skipped with a note where absent), then write the
    tables and sheets from every shard's results so far."""
    count = shape(spec)[3]
    if 1000 <= count <= MAX_CELLS:       # building and checking them takes a while: say how many first
        print(f"sweep: checking {count:,} cells", file=sys.stderr)
    every = cells(spec, overrides)
    check_cells(every, weights, out, prediction)
    make_folder(out, inversions=any(c.record.image for c in every))
    k, n = shard
    with hold(out, shard):
        done = read_results(out)
        todo = [c for c in every if c.index % n == k and c.key not in done]
        print(f"sweep: {len(every)} cells, {sum(c.index % n == k for c in every)} in shard {k}/{n}, "
              f"{len(todo)} to run", file=sys.stderr)
        if todo:
            sd, path = load_model(), results_file(out, shard)
            nets = Nets(metrics.Clip.load(clip) if clip else None, metrics.Dino.load(dino) if dino else None)
            region, threshold = spec.get("region", "blend"), spec.get("region_threshold", 0.3)
            for cell in tqdm(todo, desc="cells", file=sys.stderr):
                append(path, run_cell(sd, cell, weights, out, nets, region, threshold))
            print(f"wrote {path} (+{len(todo)} cells) and their images in {out / 'cells'}", file=sys.stderr)
    report(spec, every, out)
    return every


# ---- tables and sheets ------------------------------------------------------------------

def value_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def mean_sd(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    if any(math.isinf(v) for v in values):
        return "inf" if all(math.isinf(v) for v in values) else f"inf ({sum(map(math.isinf, values))} of {len(values)})"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4g} ± {sd:.2g}"


def report(spec: dict, every: list[Cell], out: Path):
    """results.csv (one row per cell and target), summary.md (per axis: mean ± sd over cases,
    seeds and the other axes) and sheet-AXIS.png, from the results files alone; each named as written."""
    if not out.is_dir():
        raise InputError(f"--out {out}: no such folder (the tables are made from a sweep's results there)")
    done = read_results(out)
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
    write_text(out / "results.csv", table.getvalue())
    lines = [f"# Sweep summary\n\n{len(rows)} of {len(every)} cells done; each figure is the mean ± sd over "
             "cases, seeds, targets and the other axes.\n"]
    for axis in axes:
        lines += [f"\n## {axis}\n", "| " + " | ".join([axis, "cells", *names]) + " |",
                  "| " + " | ".join(["---"] * (2 + len(names))) + " |"]
        for value in spec["axes"][axis]:
            picked = [r for _, r in rows if r["axes"][axis] == value]
            per = {x: [t[x] for r in picked for t in r["metrics"] if x in t] for x in names}
            lines.append("| " + " | ".join([value_text(value), str(len(picked)), *(mean_sd(per[x]) for x in names)])
                         + " |")
    write_text(out / "summary.md", "\n".join(lines) + "\n")
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
