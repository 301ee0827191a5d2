"""`p2p sweep`: one experiment record per cell of a grid (or zip) of axes over cases, resumable.

A spec is JSON:

    {"base":  {record fields every cell shares},
     "cases": [{"name": "cat", record fields: prompts, mode, words...}, ...],
     "axes":  {"cross_sites": ["any@0", "any@1"], "seed": [0, 1]},
     "combine": "grid",                       (or "zip": the axes' i-th values together)
     "region": "blend"}                       (or "attention", "none": the edit region of the metrics)

Each cell is record = base | case | one value per axis, checked before anything samples (a bad
entry is one error naming its path, "spec.cases[1].blend"). Cells are numbered in a fixed order
(cases outermost, then the axes as written); process K of N takes the cells i with i % N == K
(`--shard K/N`, or RANK/WORLD_SIZE as torchrun sets them, or SLURM's array variables) and
appends each finished one, whole record and metrics, as a line of DIR/results.jsonl
(DIR/results.K-of-N.jsonl for a shard). A rerun skips the cells any results file holds.
The tables (results.csv, summary.md) and the contact sheets (sheet-AXIS.png) are made from
all results files and the images under DIR/cells, never kept apart from them.

Metrics (p2p/metrics.py) compare each target with its cell's source, read back from the saved
PNGs: background MSE, PSNR, SSIM outside the edit region and locality inside it (the region:
the blend's final mask or drawn blend_mask; the edited words' attention, see metrics.attention_masks;
or none), and with their weights the CLIP score and direction and DINO structure distance.
"""
import csv
import hashlib
import itertools
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from models import InputError
from models.checkpoint import load

from . import metrics, output, record, run, viz
from .record import Experiment

METRICS = ("mse", "psnr", "ssim", "locality", "clip_score", "clip_direction", "structure")
REGIONS = ("blend", "attention", "none")
SPEC_KEYS = ("base", "cases", "axes", "combine", "region", "region_threshold", "about")


@dataclass(frozen=True)
class Cell:
    index: int
    case_index: int                           # where its case is in spec.cases
    case: str
    axes: tuple[tuple[str, object], ...]      # (field, JSON value) in the spec's order
    record: Experiment

    @property
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


def check_values(fields: dict, where: str):
    """Each field alone, so an error names the entry it came from."""
    for name, value in fields.items():
        if name not in record.FIELDS:
            raise InputError(f"{where}: unknown field {name!r} (the fields are {', '.join(record.FIELDS)})")
        try:
            record.CHECKS[name](value)
        except ValueError as e:
            raise InputError(f"{where}.{name}: {e}") from None


def cells(spec: dict, overrides: dict | None = None) -> list[Cell]:
    """Every cell of the spec, each record checked (with `overrides` on top of the base)."""
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
    check_values(base, "spec.base")
    for name, values in axes.items():
        if name not in record.FIELDS:
            raise InputError(f"spec.axes: unknown field {name!r}")
        if not isinstance(values, list) or not values:
            raise InputError(f"spec.axes.{name}: a non-empty list of values")
        for j, value in enumerate(values):
            try:
                record.CHECKS[name](value)
            except ValueError as e:
                raise InputError(f"spec.axes.{name}[{j}]: {e}") from None
    combine = spec.get("combine", "grid")
    if combine == "zip":
        if len({len(v) for v in axes.values()}) > 1:
            raise InputError(f"spec: zipped axes need as many values each, got "
                             f"{', '.join(f'{k} {len(v)}' for k, v in axes.items())}")
        combos = list(zip(*axes.values())) if axes else [()]
    elif combine == "grid":
        combos = list(itertools.product(*axes.values()))
    else:
        raise InputError(f"spec.combine: grid or zip, got {combine!r}")
    out, names = [], set()
    for i, case in enumerate(cases):
        where = f"spec.cases[{i}]"
        if not isinstance(case, dict) or not isinstance(case.get("name"), str):
            raise InputError(f"{where}: a case is an object with a name and record fields")
        if case["name"] in names:
            raise InputError(f"{where}: a second case named {case['name']!r}")
        names.add(case["name"])
        fields = {k: v for k, v in case.items() if k != "name"}
        check_values(fields, where)
        for combo in combos:
            values = dict(zip(axes, combo))
            r = record.from_json({**base, **(overrides or {}), **fields, **values}, where)
            out.append(Cell(len(out), i, case["name"], tuple(values.items()), r))
    return out


def shard_of(text: str | None) -> tuple[int, int]:
    """(K, N): from --shard K/N, else torchrun's RANK/WORLD_SIZE, else a SLURM array's task id
    among its count, else (0, 1)."""
    env = os.environ
    if text is not None:
        try:
            k, n = (int(x) for x in text.split("/"))
        except ValueError:
            raise InputError(f"--shard takes K/N, e.g. 0/4, got {text!r}") from None
    elif "RANK" in env and "WORLD_SIZE" in env:
        k, n = int(env["RANK"]), int(env["WORLD_SIZE"])
    elif "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        k = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        n = int(env["SLURM_ARRAY_TASK_COUNT"])
    else:
        k, n = 0, 1
    if not 0 <= k < n:
        raise InputError(f"shard {k}/{n}: need 0 <= K < N")
    return k, n


# ---- results ----------------------------------------------------------------------------

def results_file(out: Path, shard: tuple[int, int]) -> Path:
    k, n = shard
    return out / ("results.jsonl" if n == 1 else f"results.{k}-of-{n}.jsonl")


def read_results(out: Path) -> dict[str, dict]:
    """Every finished cell of every results file, by key; a torn last line (a killed run) is skipped."""
    done = {}
    for path in sorted(out.glob("results*.jsonl")):
        for n, line in enumerate(path.read_text().splitlines()):
            try:
                row = json.loads(line)
                done[row["key"]] = row
            except (ValueError, KeyError):
                print(f"note: {path.name} line {n + 1} is not a finished cell (a run stopped while writing?); "
                      "it will be run again", file=sys.stderr)
    return done


def append(path: Path, row: dict):
    """One line, flushed to disk before the next cell starts: a killed run loses one cell at most."""
    with open(path, "a+b") as f:                      # appends wherever the reading position is
        end = f.seek(0, os.SEEK_END)
        torn = end > 0 and f.seek(end - 1) >= 0 and f.read(1) != b"\n"   # a killed run's cut line
        f.write(b"\n" * torn + json.dumps(row, ensure_ascii=False).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())


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


def cell_metadata(r: Experiment, sd, dtype: str, software: str) -> dict[str, str]:
    """What a cell's images carry: the whole record (a `p2p edit --recipe` of them re-runs it) and the model."""
    return {"experiment": json.dumps(r.to_json(), ensure_ascii=False), "software": software, "checkpoint": sd.name,
            "checkpoint_fingerprint": sd.fingerprint, "prediction": sd.prediction, "dtype": dtype}


def run_cell(sd, cell: Cell, weights: Path, out: Path, dtype: str, nets: Nets = Nets(), region: str = "blend",
             threshold: float = 0.3) -> dict:
    """Sample one cell, save its images (and its edit regions), and measure them."""
    plan = run.prepare(cell.record, weights, cache_dir=out / "inversions", store=region == "attention",
                       prediction=sd.prediction)
    result = run.run(sd, plan, dtype)
    blend = plan.edit.blend
    if region == "attention":
        masks = metrics.attention_masks(result, threshold)
    elif region == "blend" and blend is not None and blend.last_mask is not None:
        size = result.images[0].size[::-1]
        masks = [F.interpolate(blend.last_mask[1 + i][None].float(), size=size)[0, 0] > 0.5
                 for i in range(len(cell.record.targets))]
    else:
        masks = [None] * len(cell.record.targets)
    meta = cell_metadata(cell.record, sd, dtype, "p2p sweep")
    names = {"source": f"cells/{cell.key}.source.png",
             "targets": [f"cells/{cell.key}.target{i}.png" for i in range(len(cell.record.targets))], "regions": []}
    output.save_image(out / names["source"], result.images[0], meta)
    for i, (target, mask) in enumerate(zip(names["targets"], masks)):
        output.save_image(out / target, result.images[1 + i], meta)
        names["regions"].append(None if mask is None else f"cells/{cell.key}.target{i}.region.png")
        if mask is not None:
            output.save_image(out / names["regions"][-1], Image.fromarray(mask.numpy().astype(np.uint8) * 255), meta)
    return {"key": cell.key, "index": cell.index, "case": cell.case, "axes": dict(cell.axes),
            "record": cell.record.to_json(), "images": names, "metrics": cell_metrics(out, names, cell.record, nets)}


def make_folder(out: Path):
    """The sweep's folder (with its parents) and its cells/ and inversions/, written to once."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file: a sweep writes a folder")
    try:
        for sub in ("cells", "inversions"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        probe = out / ".p2p-write-test"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise InputError(f"cannot make the sweep folder {out}: {e.strerror or e}") from None


def check_cells(every: list[Cell], weights: Path, out: Path, prediction: str | None = None):
    """Every cell's words, sizes, photo and layers, before the model loads (its architecture is
    read from the checkpoint's headers)."""
    architecture = load(weights, "meta", prediction=prediction)
    for cell in every:
        try:
            run.prepare(cell.record, weights, cache_dir=out / "inversions", prediction=architecture.prediction)
            run.check_model(architecture, cell.record)
        except InputError as e:
            raise InputError(f"spec.cases[{cell.case_index}] ({cell.case}, cell {cell.index}): {e}") from None


def sweep(spec: dict, weights: Path, out: Path, shard: tuple[int, int] = (0, 1), overrides: dict | None = None,
          load_model=None, dtype: str = "float32", clip: Path | None = None, dino: Path | None = None,
          prediction: str | None = None) -> list[Cell]:
    """Run this shard's unfinished cells (the model comes from `load_model()`, only if there are
    any; CLIP and DINO from their folders, skipped with a note where absent), then write the
    tables and sheets from every shard's results so far."""
    every = cells(spec, overrides)
    make_folder(out)
    check_cells(every, weights, out, prediction)
    done = read_results(out)
    k, n = shard
    todo = [c for c in every if c.index % n == k and c.key not in done]
    print(f"sweep: {len(every)} cells, {sum(c.index % n == k for c in every)} in shard {k}/{n}, "
          f"{len(todo)} to run", file=sys.stderr)
    if todo:
        sd, path = load_model(), results_file(out, shard)
        nets = Nets(metrics.Clip.load(clip) if clip else None, metrics.Dino.load(dino) if dino else None)
        region, threshold = spec.get("region", "blend"), spec.get("region_threshold", 0.3)
        for cell in tqdm(todo, desc="cells", file=sys.stderr):
            append(path, run_cell(sd, cell, weights, out, dtype, nets, region, threshold))
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
    seeds and the other axes) and sheet-AXIS.png, from the results files alone."""
    done = read_results(out)
    rows = [(c, done[c.key]) for c in every if c.key in done]
    axes = list(spec.get("axes", {}))
    names = [m for m in METRICS if any(m in t for _, r in rows for t in r["metrics"])]
    with open(out / "results.csv.tmp", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["key", "case", *axes, "target", *names])
        for c, r in rows:
            for t, m in enumerate(r["metrics"]):
                w.writerow([c.key, c.case, *(value_text(r["axes"][a]) for a in axes), t,
                            *(f"{m[x]:.6g}" if x in m else "" for x in names)])
    os.replace(out / "results.csv.tmp", out / "results.csv")
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
    (out / "summary.md.tmp").write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(out / "summary.md.tmp", out / "summary.md")
    for axis in axes:
        sheet(spec, every, done, axis, out)


def sheet(spec: dict, every: list[Cell], done: dict, axis: str, out: Path):
    """Rows: the source, then one row per value of `axis`; columns: the cases. The other axes
    stay at their first values; a cell not run yet is a grey tile."""
    firsts = {a: v[0] for a, v in spec["axes"].items()}
    cases = list(dict.fromkeys(c.case for c in every))

    def find(case, value):
        want = {**firsts, axis: value}
        return next((done.get(c.key) for c in every if c.case == case and dict(c.axes) == want), None)

    def tile(row, name):
        if row is None:
            return None
        with Image.open(out / (row["images"]["source"] if name == "source" else row["images"]["targets"][0])) as im:
            return im.convert("RGB")

    first = [tile(find(c, spec["axes"][axis][0]), "source") for c in cases]
    size = next((t.size for t in first if t is not None), (128, 128))
    grey = Image.new("RGB", size, (200, 200, 200))
    rows = [output.labelled_row([output.text_tile("source", size), *(t or grey for t in first)], ["", *cases])]
    for value in spec["axes"][axis]:
        tiles = [tile(find(c, value), "target") for c in cases]
        title = output.text_tile(f"{axis} = {value_text(value)}", size)
        rows.append(output.labelled_row([title, *(t or grey for t in tiles)], [""] * (1 + len(cases))))
    output.save_image(out / f"sheet-{axis}.png", viz.stack(rows), {"software": "p2p sweep", "axis": axis})
