"""One road from an experiment record (p2p/experiment/record.py) to files.

    plan = prepare(record, weights, outputs)   # every check, against the checkpoint's headers; nothing sampled
    sd = load(weights)                         # the slow part, once checks have passed
    result = run(sd, plan)                     # invert the photo if needed, sample, decode
    write(result, plan.outputs)                # images, latents, maps: each with the record in its metadata

`p2p edit`, sweeps, `p2p bench pie` and scripts/reproduce_paper.py all take it, so the fields a
record leaves to the model (None: its native size, and the blend and map resolution and the
self-attention limit that scale with it) are filled in the same way for every caller, by prepare.
"""
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models import InputError
from models.checkpoint import StableDiffusion
from models.checkpoint import load as load_checkpoint
from models.files import check_device
from models.text import check_prompts, load_tokenizer

from .. import check_finite, edits, sampler, viz
from ..blend import AttentionStore, LocalBlend, MaskBlend
from . import output, photo
from .photo import Inversion, open_image
from .record import NATIVE, Experiment, anchored, site_text

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---- the model ----------------------------------------------------------------------------

def device_of(name: str | None) -> str:
    """The device named, or by default CUDA if there is one (the process's own GPU, LOCAL_RANK, when
    torchrun started several), else the CPU."""
    if name is None:
        if not torch.cuda.is_available():
            return "cpu"
        local = os.environ.get("LOCAL_RANK")
        return f"cuda:{int(local) % torch.cuda.device_count()}" if local else "cuda"
    check_device(name)
    return name


def load(weights: Path, device: str | None = None, dtype: str = "float32", prediction: str | None = None):
    """The model, for run(): on `device` (default device_of(None)) in `dtype`, saying how long it took."""
    device, start = device_of(device), time.perf_counter()
    if dtype == "float16" and device == "cpu":
        print("note: float16 on a CPU is no faster than float32 and can be far slower (about 15x on CPUs "
              "without float16 arithmetic); --dtype bfloat16 is the fast half precision on CPUs", file=sys.stderr)
    sd = load_checkpoint(weights, device, DTYPES[dtype], prediction)
    print(f"loaded {sd.name} ({dtype}, {device}) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return sd


def defaults(model: StableDiffusion, height: int | None = None, width: int | None = None) -> dict:
    """The model's own values of the fields a record may leave to it: the image side it was trained
    at, and the paper's 16x16 blend and map resolution and its 16 x 16 self-attention keys (the maps
    at 1/32 of the image side, at 512 px), which scale with the image for a model native to another
    size (24x24 and 576 keys at 768). A model native to 512 px keeps 16 and 256 at every size."""
    h, w = height or model.native_size, width or model.native_size
    if model.native_size == 512:
        return {"height": h, "width": w, "blend_res": 16, "self_max_tokens": 256}
    # 1/32 of the side, or the nearest finer side that has down/up cross-attention maps (the baby
    # model's 64 px attend at 8 and 4 only: 4 then, with 4 x 4 keys)
    maps = sorted({s.res for s in model.unet.sites(h // 8, w // 8) if s.is_cross and s.place != "mid"}, key=min)
    res = next((r for r in maps if min(r) >= min(h, w) // 32), maps[-1] if maps else (h // 32, w // 32))
    return {"height": h, "width": w, "blend_res": max(1, min(res)), "self_max_tokens": res[0] * res[1]}


def about(model: StableDiffusion, software: str) -> dict[str, str]:
    """What every output records of the model that made it and how."""
    return {"checkpoint": model.name, "checkpoint_fingerprint": model.fingerprint, "prediction": model.prediction,
            "dtype": str(model.dtype).removeprefix("torch."), "device": str(model.device), "software": software}


def metadata(record: Experiment, model: StableDiffusion, software: str) -> dict[str, str]:
    """What every output of a record carries: each field on its own (strings as they are, the rest
    as JSON), the whole record with its file paths absolute (a --recipe takes relative ones from its
    own folder), the size as WIDTHxHEIGHT, and the model."""
    data = anchored(record.to_json(), os.getcwd())
    text = lambda v: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
    return {**{k: text(v) for k, v in data.items() if v is not None}, "experiment": text(data),
            "size": f"{record.width}x{record.height}", **about(model, software)}


# ---- before the model: the plan -------------------------------------------------------------

@dataclass(frozen=True)
class Outputs:
    """What write() makes of a result; None is not written."""
    image: Path | None = None        # the images side by side, labelled (a photo edit: the photo first)
    latents: Path | None = None      # safetensors: the final latents [1 + k, 4, h, w]
    maps: Path | None = None         # per-token cross-attention maps of every prompt
    maps_res: int | None = None      # their resolution (None: the model's default, as blend_res)
    tiles: Path | None = None        # PREFIX: PREFIX.source.png, PREFIX.target{i}.png (PREFIX.photo.png), each alone
    software: str = "p2p edit"       # who made them, in their metadata


@dataclass
class Plan:
    """A record checked and completed without the model, with what its run needs."""
    record: Experiment               # every field filled in, the settings a given inversion file fixes included
    edit: edits.PromptToPrompt
    photo: photo.Photo | None
    outputs: Outputs                 # maps_res filled in


def build_edit(record: Experiment, tokenizer, store: bool = False) -> edits.PromptToPrompt:
    """The PromptToPrompt edit the record describes; every word is checked here."""
    prompts = record.prompts
    cross = None
    if record.mode == "replace":
        cross = edits.Replace(tokenizer, prompts, official=record.replace_mapper == "official")
    elif record.mode == "refine":
        cross = edits.Refine(tokenizer, prompts)
    if record.reweight:
        cross = edits.Reweight(tokenizer, prompts, record.reweight, prev=cross)
    blend = None
    if record.blend_mask:
        blend = MaskBlend(read_mask(Path(record.blend_mask)), start=int(record.blend_start * record.steps))
    elif record.blend:   # (record.check allows one of the two)
        blend = LocalBlend(tokenizer, prompts, [list(w) for w in record.blend], record.blend_threshold,
                           record.blend_res, subtract=[list(w) for w in record.blend_subtract] or None,
                           start=int(record.blend_start * record.steps))
    return edits.PromptToPrompt(tokenizer, prompts, record.steps, cross,
                                {"default": record.cross_steps, **record.word_steps}, record.self_steps,
                                record.self_max_tokens, blend, AttentionStore() if store else None,
                                cross_sites=lambda s: edits.picks(record.cross_sites, s),
                                self_sites=lambda s: edits.picks(record.self_sites, s))


def read_mask(path: Path) -> torch.Tensor:
    """A drawn edit region: any image Pillow reads, its pixels brighter than half are the region;
    where the image has alpha, only its opaque pixels (alpha > 127) can be: transparent is outside."""
    image = open_image(path, f"blend mask {path}")
    region = torch.from_numpy(np.asarray(image.convert("L")) > 127)
    if image.has_transparency_data:
        region &= torch.from_numpy(np.asarray(image.convert("RGBA").getchannel("A")) > 127)
    if not region.any():
        raise InputError(f"blend mask {path} is black all over: no pixel marks the edit region (bright, > 127, "
                         "and opaque where it has alpha)")
    return region


def check_resolution(model, height: int, width: int, res: int, what: str):
    """Fail before sampling when no down/up cross-attention runs at `res` for this image size."""
    have = sorted({edits.side(s) for s in model.unet.sites(height // 8, width // 8)
                   if s.is_cross and s.place != "mid"}, reverse=True)
    if res not in have:
        raise InputError(f"{what} {res}: at {width}x{height} this model has down/up "
                         f"cross-attention at resolutions {have} only")


def check_sites(model, height: int, width: int, items, is_cross: bool, what: str, max_tokens: int | None = None):
    """Fail before sampling when a PLACE:SIDE item picks no layer of the model at this size (or,
    for self-attention, only layers with more keys than the injection takes)."""
    layers = [s for s in model.unet.sites(height // 8, width // 8) if s.is_cross == is_cross]
    for place, side in items:
        picked = [s for s in layers if edits.picks([(place, side)], s)]
        if not picked:
            have = ", ".join(dict.fromkeys(f"{s.place}:{edits.side(s)}" for s in layers))
            raise InputError(f"{what} {site_text(place, side)}: at {width}x{height} this model has no "
                             f"{'cross' if is_cross else 'self'}-attention layer there; it has {have}")
        keys = min(s.res[0] * s.res[1] for s in picked)
        if max_tokens is not None and keys > max_tokens:
            raise InputError(f"{what} {site_text(place, side)}: those layers have {keys} keys or more, above the "
                             f"self_max_tokens (--self-max-tokens) of {max_tokens}, so nothing would be injected")


def check_model(model, record: Experiment):
    """What only the architecture can tell: the blend's resolution and the chosen layers exist at
    this size."""
    if record.blend:
        check_resolution(model, record.height, record.width, record.blend_res, "blend_res (--blend-res)")
    check_sites(model, record.height, record.width, record.cross_sites, True, "cross_sites (--cross-sites)")
    check_sites(model, record.height, record.width, record.self_sites, False, "self_sites (--self-sites)",
                record.self_max_tokens)


def prepare(record: Experiment, weights: Path, outputs: Outputs = Outputs(), *, model: StableDiffusion | None = None,
            prediction: str | None = None, cache_dir: Path | None = None, store: bool = False,
            recipe: Path | None = None) -> Plan:
    """Check everything before the slow load: the record against the model's architecture (read
    off the checkpoint's headers, or from `model`, any device), its words, the photo and its
    inversion (against the weights' fingerprint), and every output path (never an input, such as
    the weights, the photo or the `recipe` file). A new inversion will be kept in `cache_dir`
    (None: not kept). `store` keeps the attention maps (outputs.maps does too)."""
    model = model or load_checkpoint(weights, "meta", prediction=prediction)
    native = defaults(model, record.height, record.width)
    record = dataclasses.replace(record, **{k: native[k] for k in NATIVE if getattr(record, k) is None})
    paths = {k: Path(v) for k in ("image", "latents", "maps", "tiles") if (v := getattr(outputs, k)) is not None}
    outputs = dataclasses.replace(outputs, **paths, maps_res=outputs.maps_res or native["blend_res"])
    tokenizer = load_tokenizer()
    check_prompts(tokenizer, record.prompts)
    edit = build_edit(record, tokenizer, store or outputs.maps is not None)
    shot = None
    if record.image is not None:
        shot = photo.prepare(record, model.name, model.fingerprint, cache_dir, model.prediction)
        record = dataclasses.replace(record, **shot.fixed)   # what a given inversion file fixes
    new_cache = shot.cache if shot is not None and shot.inversion is None else None
    meta = metadata(record, model, outputs.software)   # as run() will write it, less the device's name
    labels = ["photo", *record.prompts] if shot is not None else record.prompts
    row = viz.row_size([(record.width, record.height)] * len(labels), labels)
    path = lambda v: v and Path(v)
    output.check_outputs({"--out": (outputs.image, "image"), "--latents-out": (outputs.latents, "tensors"),
                          "--maps-out": (outputs.maps, "image"), "the inversion cache": (new_cache, "tensors")},
                         {"--weights": Path(weights), "--image": path(record.image), "--recipe": recipe,
                          "--inversion": path(record.inversion), "--blend-mask": path(record.blend_mask)})
    if outputs.image is not None:
        output.check_image(outputs.image, row, meta)
    if outputs.maps is not None:   # (its size is known only once drawn)
        output.check_image(outputs.maps, None, meta | {"maps_res": str(outputs.maps_res)})
    check_model(model, record)
    if outputs.maps is not None:
        check_resolution(model, record.height, record.width, outputs.maps_res, "--maps-res")
    return Plan(record, edit, shot, outputs)


# ---- the model: run and write ---------------------------------------------------------------

@dataclass
class Result:
    record: Experiment
    latents: torch.Tensor            # [1 + k, 4, h, w] float32, source first
    images: list[Image.Image]        # decoded, one per prompt
    edit: edits.PromptToPrompt       # with its AttentionStore when the plan asked for one
    inversion: Inversion | None      # the photo's, for a photo edit
    photo: Image.Image | None        # the photo as the model saw it
    metadata: dict[str, str]         # what its files carry


def run(sd: StableDiffusion, plan: Plan, progress: bool = True) -> Result:
    """Sample the plan's record with its edit (from its photo's inversion, for a photo edit)."""
    record, start, inv = plan.record, {}, None
    meta = metadata(record, sd, plan.outputs.software)
    if plan.photo is not None:   # start from the inversion: x_T, null embeddings, the source row's path
        inv = photo.inversion_of(sd, plan.photo)
        start = inv.start()
        meta["inversion_method"] = inv.settings["method"]
    latents = sampler.generate(sd, record.prompts, record.seed, record.steps, record.guidance, record.height,
                               record.width, edit=plan.edit, sampler=record.sampler, progress=progress, **start)
    if inv is not None:   # how far the source row (the reconstruction) is from the photo's latents
        mse = (latents[:1].cpu() - inv.z0).square().mean().item()
        print(f"reconstruction (row 0, {inv.settings['method']}): latent MSE {mse:.3e}", file=sys.stderr)
    decoded = sampler.decode(sd, latents)
    check_finite(f"the sampled latents and images (guidance {record.guidance})", latents, decoded)
    shown = viz.to_pil(plan.photo.image, truncate=False)[0] if plan.photo is not None else None
    return Result(record, latents, viz.to_pil(decoded), plan.edit, inv, shown, meta)


def write(result: Result, outputs: Outputs) -> list[Path]:
    """Write the outputs named (each whole or not at all), returning their paths: the pictures are
    drawn first, then every file is written."""
    r, meta = result.record, result.metadata
    row, labels = result.images, r.prompts
    if result.photo is not None:   # the photo first, then its reconstruction (the source row) and the edits
        row, labels = [result.photo, *row], ["photo", *labels]
    tiles = {"source": result.images[0], **{f"target{i}": im for i, im in enumerate(result.images[1:])}}
    if result.photo is not None:
        tiles["photo"] = result.photo
    images = {}                    # path: (image, metadata)
    if outputs.maps is not None:
        grid = viz.token_maps_grid(result.images, r.prompts, result.edit.store, load_tokenizer(), outputs.maps_res)
        images[outputs.maps] = grid, meta | {"maps_res": str(outputs.maps_res)}
    if outputs.tiles is not None:
        images |= {outputs.tiles.with_name(f"{outputs.tiles.name}.{name}.png"): (image, meta)
                   for name, image in tiles.items()}
    if outputs.image is not None:
        images[outputs.image] = viz.labelled_row(row, labels), meta
    if outputs.latents is not None:
        output.save_tensors(outputs.latents, {"latents": result.latents}, meta)
    for path, (image, metadata) in images.items():
        output.save_image(path, image, metadata)
    return [*([outputs.latents] if outputs.latents is not None else []), *images]


# ---- the other roads: no edit ---------------------------------------------------------------

def generation(sd: StableDiffusion, prompts: list[str], negative: str = "", **sampling) -> tuple[torch.Tensor, list]:
    """The prompts sampled from one noise without an edit (`sampling`: seed, steps, guidance, height,
    width, sampler): latents [b, 4, h, w] and images."""
    latents = sampler.generate(sd, prompts, negative=negative, **sampling)
    decoded = sampler.decode(sd, latents)
    check_finite(f"the sampled latents and images (guidance {sampling['guidance']})", latents, decoded)
    return latents, viz.to_pil(decoded)


def attention_maps(sd: StableDiffusion, prompt: str, res: int, window: tuple[int, int], items=(), components: int = 0,
                   **sampling) -> Image.Image:
    """The prompt's image and its token maps at `res`, averaged over the UNet calls of `window` (in
    the down and up blocks, or the layers of the PLACE:SIDE `items`), and the top `components` of
    its self-attention: one picture."""
    h, w = sampling["height"], sampling["width"]
    check_resolution(sd, h, w, res, "--res")
    check_sites(sd, h, w, items, True, "--sites")
    if items and not any(edits.picks(items, s) and edits.side(s) == res for s in sd.unet.sites(h // 8, w // 8)):
        raise InputError(f"--sites {','.join(site_text(p, q) for p, q in items)} picks no layer at --res {res}")
    store = AttentionStore(items or (("down", "any"), ("up", "any")), res, self_attention=components > 0,
                           steps=window)
    latents = sampler.generate(sd, [prompt], edit=store, **sampling)
    decoded = sampler.decode(sd, latents)
    check_finite(f"the sampled latents and image (guidance {sampling['guidance']})", latents, decoded)
    grid = viz.token_maps_grid(viz.to_pil(decoded), [prompt], store, load_tokenizer(), res)
    if components:
        grid = viz.stack([grid, viz.components_grid(viz.self_components(store, res, components))])
    return grid
