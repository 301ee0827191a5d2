"""What each `p2p` command does once cli.py has parsed its flags.

Each maps its flags to record fields (p2p/experiment/record.py), checks everything it can before
the model loads (sizes, prompts, words, the photo, every output path: bad input costs no loading
or sampling), then loads the model and runs. `p2p edit` takes the one road of
p2p/experiment/run.py (prepare, run, write), as sweeps, benchmarks and scripts do.
"""
import json
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError

from models import InputError
from models.checkpoint import load
from models.text import check_prompts, load_tokenizer

from . import check_finite, edits, sampler, viz
from .eval import metrics
from .experiment import output, photo, record, run
from .experiment.record import Experiment

SAMPLING = ("seed", "steps", "sampler", "guidance", "height", "width")   # the record fields generate and maps take


def wrote(path: Path):
    print(f"wrote {path}", file=sys.stderr)


def fields(args, names) -> dict:
    """The record fields among `names` whose flags were given (the parser leaves the others None),
    each checked as the record checks it."""
    given = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    return record.check_values({k: str(v) if isinstance(v, Path) else v for k, v in given.items()}, where=None)


def sampling(args, model) -> dict:
    """The sampling flags: those given, else the record's defaults, the size the model's native one."""
    given = fields(args, SAMPLING)
    size = run.defaults(model, given.get("height"), given.get("width"))
    return {**{k: record.FIELDS[k].default for k in SAMPLING}, "height": size["height"], "width": size["width"],
            **given}


def architecture(args):
    """The checkpoint's architecture, read off its headers (no weights are read)."""
    return load(args.weights, "meta", prediction=args.prediction)


def sampling_metadata(values: dict, model, software: str) -> dict[str, str]:
    return {"seed": str(values["seed"]), "steps": str(values["steps"]), "guidance": str(values["guidance"]),
            "size": f"{values['width']}x{values['height']}", "sampler": values["sampler"],
            **run.about(model, software)}


# ---- p2p generate ----------------------------------------------------------------------

def generate(args):
    model = architecture(args)
    values = sampling(args, model)
    for flag, prompts in (("--prompt", args.prompt), ("--negative", [args.negative])):   # before the slow load
        try:
            check_prompts(load_tokenizer(), prompts)
        except InputError as e:
            raise InputError(f"{flag}: {e}") from None
    output.check_outputs({"--out": (args.out, "image"), "--latents-out": (args.latents_out, "tensors")},
                         {"--weights": args.weights})
    metadata = {"prompts": json.dumps(args.prompt, ensure_ascii=False), "negative": args.negative,
                **sampling_metadata(values, model, "p2p generate")}
    size = (values["width"], values["height"])
    output.check_image(args.out, viz.row_size([size] * len(args.prompt), args.prompt), metadata)
    sd = run.load(args.weights, args.device, args.dtype, args.prediction)
    metadata |= run.about(sd, "p2p generate")
    latents, images = run.generation(sd, args.prompt, args.negative, **values)
    if args.latents_out is not None:
        output.save_tensors(args.latents_out, {"latents": latents}, metadata)
        wrote(args.latents_out)
    output.save_image(args.out, viz.labelled_row(images, args.prompt), metadata)
    wrote(args.out)


# ---- p2p edit --------------------------------------------------------------------------

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
    in place of its fields; without, the flags given and the record's defaults."""
    given = {k: str(v) if isinstance(v, Path) else v for k in record.FIELDS if (v := getattr(args, k)) is not None}
    recipe = read_recipe(args.recipe) if args.recipe is not None else {}
    return record.from_json({**recipe, **given}, where=None)


def edit(args):
    """`p2p edit`: the flags as a record, then the road: prepare, load, run, write."""
    r = record_of(args)
    outputs = run.Outputs(args.out, args.latents_out, args.maps_out, args.maps_res)
    plan = run.prepare(r, args.weights, outputs, prediction=args.prediction,
                       cache_dir=args.out.parent, recipe=args.recipe)
    sd = run.load(args.weights, args.device, args.dtype, args.prediction)
    for path in run.write(run.run(sd, plan), plan.outputs):
        wrote(path)


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


def maps(args):
    model = architecture(args)
    values = sampling(args, model)
    res = args.res or run.defaults(model, values["height"], values["width"])["blend_res"]
    check_prompts(load_tokenizer(), [args.prompt])
    window = steps_range(args.steps_range, sampler.calls(values["sampler"], values["steps"]))
    try:
        items = record.sites(args.sites)
    except ValueError as e:
        raise InputError(f"--sites: {e}") from None
    output.check_outputs({"--out": (args.out, "image")}, {"--weights": args.weights})
    metadata = {"prompt": args.prompt, "res": str(res), "steps_range": f"{window[0]}:{window[1]}",
                "sites": ",".join(record.site_text(p, q) for p, q in items), "components": str(args.components),
                **sampling_metadata(values, model, "p2p maps")}
    output.check_image(args.out, None, metadata)   # before the work (the grid's size is known once drawn)
    sd = run.load(args.weights, args.device, args.dtype, args.prediction)
    grid = run.attention_maps(sd, args.prompt, res, window, items, args.components, **values)
    output.save_image(args.out, grid, metadata | run.about(sd, "p2p maps"))
    wrote(args.out)


# ---- p2p sweep -------------------------------------------------------------------------

def base_fields(items: list[str]) -> dict:
    """--base FIELD=VALUE ...: record fields, each value JSON or else text, checked alone, each once."""
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
    record.check_values(overrides, "--base")
    return overrides


def sweep(args):
    from .eval import sweep as sweeps
    from .experiment import grid
    spec = sweeps.read_spec(args.spec)
    overrides = base_fields(args.base)
    if args.report:
        sweeps.report(spec, sweeps.cells(spec, overrides), args.out)
        return
    if args.weights is None:
        raise InputError("--weights is required (only --report works without a model)")
    job = grid.Job(args.weights, args.out, grid.shard_of(args.shard),
                   lambda: run.load(args.weights, args.device, args.dtype, args.prediction),
                   clip=args.clip, dino=args.dino, prediction=args.prediction)
    sweeps.sweep(spec, job, overrides)


# ---- p2p bench pie ---------------------------------------------------------------------

def bench(args):
    from .eval import pie
    from .experiment import grid
    overrides = base_fields(args.base)
    methods = args.methods or list(pie.METHODS)   # the benchmark's order
    job = grid.Job(args.weights, args.out, grid.shard_of(args.shard),
                   lambda: run.load(args.weights, args.device, args.dtype, args.prediction),
                   args.clip, args.dino, args.lpips, args.prediction)
    if args.report:
        _, every, skipped = pie.plan(args.data, args.types, args.limit, methods, overrides, job)
        pie.report(every, skipped, methods, args.out)
        return
    table = pie.bench(args.data, job, methods, args.types, args.limit, overrides)
    print(table.read_text(encoding="utf-8").split("\n\n## ")[0])


# ---- p2p sites -------------------------------------------------------------------------

def sites(args):
    """Every attention layer of the checkpoint in call order, with what --cross-sites and
    --self-sites select it by (the architecture only: the weights stay on disk)."""
    model = architecture(args)
    given = fields(args, ("height", "width"))
    size = run.defaults(model, given.get("height"), given.get("width"))
    h, w = size["height"], size["width"]
    rows = [("#", "name", "place", "level", "map", "attention", "heads", "keys", "select as")]
    for i, s in enumerate(model.unet.sites(h // 8, w // 8)):
        keys = 77 if s.is_cross else s.res[0] * s.res[1]
        rows.append((str(i), s.name, s.place, str(s.level), f"{s.res[0]}x{s.res[1]}",
                     "cross" if s.is_cross else "self", str(s.heads), str(keys), f"{s.place}:{edits.side(s)}"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    print(f"{model.name} at {w}x{h} (latents {w // 8}x{h // 8}): {len(rows) - 1} attention layers")
    for r in rows:
        print("  ".join(v.ljust(n) for v, n in zip(r, widths)).rstrip())


# ---- p2p invert, p2p download ----------------------------------------------------------

INVERSION = ("method", "inner_steps", "offsets", "steps", "guidance")   # the record fields invert takes


def report(sd, inv: photo.Inversion, z0_rec: torch.Tensor):
    """Print how far the reconstruction is from z0, and its PSNR against the VAE-only reconstruction."""
    mse = (z0_rec[:1].cpu() - inv.z0).square().mean().item()
    images = sampler.decode(sd, torch.cat([z0_rec[:1].cpu(), inv.z0]))     # [-1, 1], range 2
    psnr = metrics.psnr((images[0] + 1) / 2, (images[1] + 1) / 2)                # to [0, 1]
    print(f"reconstruction ({inv.settings['method']}, guidance {inv.settings['guidance']}): latent MSE {mse:.3e} "
          f"(z0 mean square {inv.z0.square().mean().item():.3f}), PSNR {psnr:.1f} dB against the VAE-only "
          f"reconstruction")


def invert(args):
    model = architecture(args)
    values = {**{k: record.FIELDS[k].default for k in INVERSION}, **fields(args, INVERSION)}
    size = args.size or model.native_size
    try:
        record.side(size)
    except ValueError as e:
        raise InputError(f"--size {size}: {e}") from None
    photo.check_settings(values["method"], values["steps"], size, "--size")
    check_prompts(load_tokenizer(), [args.prompt])
    output.check_outputs({"--out": (args.out, "tensors")}, {"--weights": args.weights, "--image": args.image})
    want = photo.settings(args.image, args.prompt, values["method"], values["steps"], values["guidance"],
                          values["inner_steps"], size, values["offsets"], model.name, model.fingerprint,
                          model.prediction)
    image = photo.load(args.image, want)
    sd = run.load(args.weights, args.device, args.dtype, args.prediction)
    inv = photo.invert(sd, image, want)
    check_finite(f"the inversion (guidance {values['guidance']})", inv.x_T, inv.z0, inv.null_embeddings,
                     inv.trajectory)
    report(sd, inv, photo.reconstruct(sd, inv))
    photo.save(args.out, inv, {"dtype": args.dtype, "device": str(sd.device)})
    wrote(args.out)


def download(args):
    from .download import download   # huggingface_hub, only for this command
    print(download(args.repo, args.dir, fp16=args.fp16, revision=args.revision))
