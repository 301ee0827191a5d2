"""What each `p2p` command does once cli.py has parsed its flags.

Every command first checks all it can without the model (sizes, prompts, words, the photo,
every output path), so bad input costs no loading or sampling; then it loads the model,
samples and writes. `p2p edit` builds an experiment record (p2p/experiment/record.py) from its flags
and runs it through p2p/experiment/run.py, the road scripts take too; photos have their parts in photo.py.
"""
import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors import SafetensorError

from models import InputError
from models.checkpoint import load, prediction_of
from models.files import check_device, fingerprint
from models.text import check_prompts, load_tokenizer

from . import edits, sampler, viz
from .blend import AttentionStore
from .experiment import output, photo, record, run
from .experiment.record import Experiment

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def text(value) -> str:
    """A metadata value as JSON, UTF-8 rather than \\u escapes."""
    return json.dumps(value, ensure_ascii=False)


# ---- before the model: outputs and the device ------------------------------------------

def device_of(name: str | None) -> str:
    """The --device, or by default CUDA if there is one (the process's own GPU, LOCAL_RANK, when
    torchrun started several), else the CPU."""
    if name is None:
        if not torch.cuda.is_available():
            return "cpu"
        local = os.environ.get("LOCAL_RANK")
        return f"cuda:{int(local) % torch.cuda.device_count()}" if local else "cuda"
    check_device(name)
    return name


def load_model(weights: Path, device: str | None, dtype: str, prediction: str | None = None):
    device, start = device_of(device), time.perf_counter()
    if dtype == "float16" and device == "cpu":
        print("note: float16 on a CPU is no faster than float32 and can be far slower (about 15x on CPUs "
              "without float16 arithmetic); --dtype bfloat16 is the fast half precision on CPUs", file=sys.stderr)
    sd = load(weights, device, DTYPES[dtype], prediction)
    print(f"loaded {sd.name} ({dtype}, {device}) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return sd


def run_metadata(command: str, sd, dtype: str, seed: int, steps: int, guidance: float, sampler: str,
                 height: int, width: int) -> dict[str, str]:
    """What every output records of how it was made (sizes are WIDTHxHEIGHT everywhere)."""
    return {"seed": str(seed), "steps": str(steps), "guidance": str(guidance), "size": f"{width}x{height}",
            "sampler": sampler, "checkpoint": sd.name, "checkpoint_fingerprint": sd.fingerprint,
            "prediction": sd.prediction, "dtype": dtype, "device": str(sd.device), "software": f"p2p {command}"}


def wrote(path: Path):
    print(f"wrote {path}", file=sys.stderr)


def native_defaults(args, sd=None):
    """For a model not made for 512 px (SD 2 at 768), flags left at their defaults follow it: the
    image side is its native size, and the paper's 16x16 blend and map resolution and its limit of
    16 x 16 self-attention keys (the maps at 1/32 of the image side, at 512 px) scale with the
    image: 24x24 and 576 keys at 768. Given flags and a recipe's fields stay; SD v1 keeps 16 and 256."""
    try:
        native = (sd or load(args.weights, "meta", prediction=args.prediction)).native_size
    except InputError:       # the model's own load says what is wrong, after the other checks
        return
    if native == 512:
        return
    default = lambda name: hasattr(args, name) and not getattr(args, f"_{name}_given", False)
    for name in ("height", "width", "size"):
        if default(name):
            setattr(args, name, native)
    h, w = (args.size, args.size) if hasattr(args, "size") else (args.height, args.width)
    side = max(1, min(h, w) // 32)   # at least 1 below 32 px, so no flag left alone is refused as 0
    for name, value in {"blend_res": side, "res": side, "maps_res": side,
                        "self_max_tokens": (h // 32) * (w // 32)}.items():
        if default(name):
            setattr(args, name, value)


# ---- p2p generate ----------------------------------------------------------------------

def generate(args, sd=None):
    native_defaults(args, sd)
    sampler.check_size(args.height, args.width, args.steps)
    for flag, prompts in (("--prompt", args.prompt), ("--negative", [args.negative])):   # before the slow load
        try:
            check_prompts(load_tokenizer(), prompts)
        except InputError as e:
            raise InputError(f"{flag}: {e}") from None
    output.check_outputs({"--out": (args.out, "image"), "--latents-out": (args.latents_out, "tensors")},
                  {"--weights": args.weights})
    sd = sd or load_model(args.weights, args.device, args.dtype, args.prediction)
    write_generation(sd, args.prompt, args.negative, args.dtype, args.out, args.latents_out, seed=args.seed,
                     steps=args.steps, guidance=args.guidance, height=args.height, width=args.width,
                     sampler=args.sampler)


def write_generation(sd, prompts: list[str], negative: str, dtype: str, out: Path, latents_out: Path | None,
                     **sampling):
    """Sample the prompts from one noise without an edit and write them (`sampling`: seed, steps,
    guidance, height, width, sampler)."""
    metadata = {"prompts": text(prompts), "negative": negative, **run_metadata("generate", sd, dtype, **sampling)}
    size = (sampling["width"], sampling["height"])
    output.check_image(out, viz.row_size([size] * len(prompts), prompts), metadata)   # before the work
    latents = sampler.generate(sd, prompts, negative=negative, **sampling)
    decoded = sampler.decode(sd, latents)
    run.check_finite(f"the sampled latents and images (guidance {sampling['guidance']})", latents, decoded)
    images = viz.to_pil(decoded)
    if latents_out is not None:
        output.save_tensors(latents_out, {"latents": latents}, metadata)
        wrote(latents_out)
    output.save_image(out, viz.labelled_row(images, prompts), metadata)
    wrote(out)


# ---- p2p edit --------------------------------------------------------------------------

LISTS = ("targets", "word_steps", "blend", "blend_subtract", "reweight")   # repeating flags: given when not empty


def read_recipe(path: Path) -> dict:
    """The experiment record of an earlier result (.png, .jpg, .webp, .safetensors) or a JSON file,
    its file paths (photo, mask, inversion) taken from the recipe's folder."""
    if not path.is_file():
        raise InputError(f"--recipe {path} does not exist")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text())
            data = data.get("experiment", data) if isinstance(data, dict) else data
        else:
            metadata = output.read_metadata(path)
            if "experiment" not in metadata:
                raise InputError(f"--recipe {path} holds no experiment record (only `p2p edit` writes one)")
            data = json.loads(metadata["experiment"])
    except (OSError, ValueError, SafetensorError) as e:
        raise InputError(f"--recipe {path}: cannot read it ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"--recipe {path}: an experiment record is a JSON object, got {type(data).__name__}")
    unknown = [k for k in data if k not in record.FIELDS]
    if unknown:
        raise InputError(f"--recipe {path}: unknown field {unknown[0]!r} (the fields are {', '.join(record.FIELDS)})")
    return record.anchored(data, path.parent)


def record_of(args) -> Experiment:
    """The flags as an experiment record: with --recipe, its record with the flags given after it
    in place of its fields; without, the flags alone (their defaults are the record's)."""
    flags = {field: getattr(args, "target" if field == "targets" else field) for field in record.FIELDS}
    flags = {k: str(v) if isinstance(v, Path) else v for k, v in flags.items()}
    if args.recipe is None:
        return record.from_json({k: v for k, v in flags.items() if v not in (None, []) or k not in record.REQUIRED},
                                where=None)
    given = {k: v for k, v in flags.items()
             if (bool(v) if k in LISTS else getattr(args, f"_{k}_given", False))}
    return record.from_json({**read_recipe(args.recipe), **given}, where=None)


def record_metadata(r: Experiment) -> dict[str, str]:
    """Each field on its own (strings as they are, the rest as JSON), and the whole record, its
    file paths absolute (a --recipe takes relative ones from its own folder)."""
    data = record.anchored(r.to_json(), os.getcwd())
    fields = {k: v if isinstance(v, str) else text(v) for k, v in data.items() if v is not None}
    return {**fields, "experiment": text(data)}


def edit(args, sd=None):
    """`p2p edit`: the flags as a record, then edit_record."""
    native_defaults(args, sd)
    edit_record(record_of(args), args.weights, args.out, args.latents_out, args.maps_out, args.maps_res,
                args.device, args.dtype, sd, args.prediction, args.recipe)


def edit_record(r: Experiment, weights: Path, out: Path, latents_out: Path | None = None,
                maps_out: Path | None = None, maps_res: int = 16, device: str | None = None,
                dtype: str = "float32", sd=None, prediction: str | None = None, recipe: Path | None = None):
    """Run one record (read from `recipe`, if given) and write its outputs; `sd` is an already
    loaded model (scripts run many)."""
    plan = run.prepare(r, weights, cache_dir=out.parent, store=maps_out is not None, prediction=prediction)
    r = plan.record   # with the settings a given inversion file fixes, so the outputs record what was run
    new_cache = plan.photo.cache if plan.photo is not None and plan.photo.inversion is None else None
    output.check_outputs({"--out": (out, "image"), "--latents-out": (latents_out, "tensors"),
                   "--maps-out": (maps_out, "image"), "the inversion cache": (new_cache, "tensors")},
                  {"--weights": weights, "--image": r.image and Path(r.image),
                   "--inversion": r.inversion and Path(r.inversion), "--blend-mask": r.blend_mask and Path(r.blend_mask),
                   "--recipe": recipe})
    architecture = sd or load(weights, "meta", prediction=prediction)   # its layers, before the slow load
    run.check_model(architecture, r)
    if maps_out is not None:
        run.check_resolution(architecture, r.height, r.width, maps_res, "--maps-res")
    sd = sd or load_model(weights, device, dtype, prediction)
    metadata = {**record_metadata(r), **run_metadata("edit", sd, dtype, r.seed, r.steps, r.guidance, r.sampler,
                                                     r.height, r.width)}
    labels = r.prompts
    if plan.photo is not None:   # the photo first, then its reconstruction (the source row) and the edits
        metadata |= {"inversion_method": (plan.photo.inversion or plan.photo).settings["method"]}
        labels = ["photo", *labels]
    output.check_image(out, viz.row_size([(r.width, r.height)] * len(labels), labels), metadata)
    if maps_out is not None:   # (its size is known only once drawn)
        output.check_image(maps_out, None, metadata | {"maps_res": str(maps_res)})
    result = run.run(sd, plan, dtype)
    row = result.images
    if result.photo is not None:
        row = [result.photo, *row]
        photo.report_latents(result.inversion, result.latents)
    if latents_out is not None:
        output.save_tensors(latents_out, {"latents": result.latents}, metadata)
        wrote(latents_out)
    if maps_out is not None:
        grid = viz.token_maps_grid(result.images, r.prompts, result.edit.store, load_tokenizer(), maps_res)
        output.save_image(maps_out, grid, metadata | {"maps_res": str(maps_res)})
        wrote(maps_out)
    output.save_image(out, viz.labelled_row(row, labels), metadata)
    wrote(out)


# ---- p2p maps --------------------------------------------------------------------------

def steps_range(text: str, steps: int) -> tuple[int, int]:
    """"a:b" -> (a, b), the half-open range of step indices (UNet calls: N + 1 under PLMS);
    "" -> every step."""
    if not text:
        return 0, steps
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise InputError(f"--steps-range takes START:END step indices, got {text!r}") from None
    if not 0 <= a < b <= steps:
        raise InputError(f"--steps-range {text}: need 0 <= START < END <= {steps}")
    return a, b


def maps(args, sd=None):
    native_defaults(args, sd)
    sampler.check_size(args.height, args.width, args.steps)
    check_prompts(load_tokenizer(), [args.prompt])
    window = steps_range(args.steps_range, sampler.calls(args.sampler, args.steps))
    output.check_outputs({"--out": (args.out, "image")}, {"--weights": args.weights})
    try:
        items = record.sites(args.sites)
    except ValueError as e:
        raise InputError(f"--sites: {e}") from None
    sd = sd or load_model(args.weights, args.device, args.dtype, args.prediction)
    write_maps(sd, args.prompt, args.res, window, args.components, args.dtype, args.out, items, seed=args.seed,
               steps=args.steps, guidance=args.guidance, height=args.height, width=args.width, sampler=args.sampler)


def write_maps(sd, prompt: str, res: int, window: tuple[int, int], components: int, dtype: str, out: Path,
               items=(), **sampling):
    """Sample the prompt, storing its attention at `res` over the steps of `window` (in the down and
    up blocks, or the layers of the PLACE:SIDE `items`), and draw the token maps (and the top
    `components` of self-attention) over its image."""
    h, w = sampling["height"], sampling["width"]
    run.check_resolution(sd, h, w, res, "--res")
    run.check_sites(sd, h, w, items, True, "--sites")
    if items and not any(edits.picks(items, s) and edits.side(s) == res for s in sd.unet.sites(h // 8, w // 8)):
        raise InputError(f"--sites {','.join(record.site_text(p, q) for p, q in items)} picks no layer at --res {res}")
    store = AttentionStore(items or (("down", "any"), ("up", "any")), res, self_attention=components > 0,
                           steps=window)
    metadata = {"prompt": prompt, "res": str(res), "steps_range": f"{window[0]}:{window[1]}",
                "sites": ",".join(record.site_text(p, q) for p, q in items),
                "components": str(components), **run_metadata("maps", sd, dtype, **sampling)}
    output.check_image(out, None, metadata)   # before the work (the grid's size is known once drawn)
    latents = sampler.generate(sd, [prompt], edit=store, **sampling)
    decoded = sampler.decode(sd, latents)
    run.check_finite(f"the sampled latents and image (guidance {sampling['guidance']})", latents, decoded)
    images = viz.to_pil(decoded)
    grid = viz.token_maps_grid(images, [prompt], store, load_tokenizer(), res)
    if components:
        grid = viz.stack([grid, viz.components_grid(viz.self_components(store, res, components))])
    output.save_image(out, grid, metadata)
    wrote(out)


# ---- p2p sweep -------------------------------------------------------------------------

def base_fields(items: list[str]) -> dict:
    """--base FIELD=VALUE ...: record fields, each value JSON or else text, checked alone, each once."""
    from .experiment.sweep import check_values
    overrides = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"--base takes FIELD=VALUE, got {item!r}")
        if name in overrides:
            raise InputError(f"--base {name} given twice")
        try:
            overrides[name] = json.loads(value)
        except ValueError:
            overrides[name] = value            # text, e.g. a prompt or a site list
    check_values(overrides, "--base")
    return overrides


def sweep(args):
    from .experiment import grid, sweep as sweeps
    spec = sweeps.read_spec(args.spec)
    overrides = base_fields(args.base)
    if args.report:
        sweeps.report(spec, sweeps.cells(spec, overrides), args.out)
        return
    if args.weights is None:
        raise InputError("--weights is required (only --report works without a model)")
    sweeps.sweep(spec, args.weights, args.out, grid.shard_of(args.shard), overrides,
                 lambda: load_model(args.weights, args.device, args.dtype, args.prediction), args.dtype, args.clip,
                 args.dino, args.prediction)


# ---- p2p bench pie ---------------------------------------------------------------------

def bench(args):
    from .eval import pie
    from .experiment import grid
    overrides = base_fields(args.base)
    if args.report:
        _, every, skipped = pie.plan(args.data, args.types, args.limit, args.methods, overrides, args.weights,
                                     args.out, args.prediction)
        pie.report(every, skipped, args.methods, args.out)
        return
    table = pie.bench(args.data, args.weights, args.out, args.methods, args.types, args.limit,
                      grid.shard_of(args.shard), overrides,
                      lambda: load_model(args.weights, args.device, args.dtype, args.prediction),
                      args.dtype, args.clip, args.dino, args.lpips, args.prediction)
    print(table.read_text(encoding="utf-8").split("\n\n## ")[0])


# ---- p2p sites -------------------------------------------------------------------------

def sites(args):
    """Every attention layer of the checkpoint in call order, with what --cross-sites and
    --self-sites select it by (the architecture only: the weights stay on disk)."""
    sd = load(args.weights, "meta", prediction=args.prediction)
    native_defaults(args, sd)
    sampler.check_size(args.height, args.width, 1)
    rows = [("#", "name", "place", "level", "map", "attention", "heads", "keys", "select as")]
    for i, s in enumerate(sd.unet.sites(args.height // 8, args.width // 8)):
        keys = 77 if s.is_cross else s.res[0] * s.res[1]
        rows.append((str(i), s.name, s.place, str(s.level), f"{s.res[0]}x{s.res[1]}",
                     "cross" if s.is_cross else "self", str(s.heads), str(keys), f"{s.place}:{edits.side(s)}"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    print(f"{sd.name} at {args.width}x{args.height} (latents {args.width // 8}x{args.height // 8}): "
          f"{len(rows) - 1} attention layers")
    for r in rows:
        print("  ".join(v.ljust(n) for v, n in zip(r, widths)).rstrip())


# ---- p2p invert, p2p download ----------------------------------------------------------

def invert(args):
    native_defaults(args)
    sampler.check_size(args.size, args.size, args.steps, "--size")
    photo.check_settings(args.method, args.steps, args.size, "--size")
    check_prompts(load_tokenizer(), [args.prompt])
    output.check_outputs({"--out": (args.out, "tensors")}, {"--weights": args.weights, "--image": args.image})
    try:
        offsets = record.offsets(args.offsets)
    except ValueError as e:
        raise InputError(f"--offsets: {e}") from None
    want = photo.settings(args.image, args.prompt, args.method, args.steps, args.guidance, args.inner_steps,
                          args.size, offsets, Path(args.weights).name, fingerprint(args.weights),
                          prediction_of(args.weights, args.prediction))
    image = photo.load(args.image, want)
    sd = load_model(args.weights, args.device, args.dtype, args.prediction)
    inv = photo.invert(sd, image, want)
    run.check_finite(f"the inversion (guidance {args.guidance})", inv.x_T, inv.z0, inv.null_embeddings,
                     inv.trajectory)
    photo.report(sd, inv, photo.reconstruct(sd, inv))
    photo.save(args.out, inv, {"dtype": args.dtype, "device": str(sd.device)})
    wrote(args.out)


def download(args):
    from .download import download   # huggingface_hub, only for this command
    print(download(args.repo, args.dir, fp16=args.fp16, revision=args.revision))
