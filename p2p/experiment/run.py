"""One road from an experiment record (p2p/experiment/record.py) to latents and images.

    plan = prepare(record, weights)     # no model: words, sizes, the photo and its inversion
    result = run(sd, plan)              # the model: invert if needed, sample, decode

The CLI (`p2p edit`), scripts/reproduce_paper.py and sweeps all go through these two.
"""
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models import InputError
from models.checkpoint import prediction_of
from models.files import fingerprint
from models.text import check_prompts, load_tokenizer

from .. import edits, sampler, viz
from ..blend import AttentionStore, LocalBlend, MaskBlend
from . import photo
from .photo import Inversion, open_image
from .record import Experiment, site_text


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


@dataclass
class Plan:
    """A record checked without the model, with what its run needs."""
    record: Experiment
    edit: edits.PromptToPrompt
    photo: photo.Photo | None


def prepare(record: Experiment, weights: Path, cache_dir: Path | None = None, store: bool = False,
            prediction: str | None = None) -> Plan:
    """Check everything the model is not needed for: sizes, prompts, words, the photo and its
    inversion (against the weights' fingerprint). A new inversion will be kept in `cache_dir`
    (default: the photo's folder). `store` keeps the attention maps for drawing."""
    sampler.check_size(record.height, record.width, record.steps)
    tokenizer = load_tokenizer()
    check_prompts(tokenizer, record.prompts)
    edit = build_edit(record, tokenizer, store)
    shot = None
    if record.image is not None:
        cache = Path(record.image).parent if cache_dir is None else cache_dir
        shot = photo.prepare(record, Path(weights).name, fingerprint(weights), cache,
                             prediction_of(weights, prediction))
        record = dataclasses.replace(record, **shot.fixed)   # what a given inversion file fixes
    return Plan(record, edit, shot)


def check_resolution(sd, height: int, width: int, res: int, what: str):
    """Fail before sampling when no down/up cross-attention runs at `res` for this image size."""
    have = sorted({edits.side(s) for s in sd.unet.sites(height // 8, width // 8)
                   if s.is_cross and s.place != "mid"}, reverse=True)
    if res not in have:
        raise InputError(f"{what} {res}: at {width}x{height} this model has down/up "
                         f"cross-attention at resolutions {have} only")


def check_sites(sd, height: int, width: int, items, is_cross: bool, what: str, max_tokens: int | None = None):
    """Fail before sampling when a PLACE:SIDE item picks no layer of the model at this size (or,
    for self-attention, only layers with more keys than the injection takes)."""
    layers = [s for s in sd.unet.sites(height // 8, width // 8) if s.is_cross == is_cross]
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


def check_finite(what: str, *tensors):
    """Refuse results holding nan or inf before anything is written: they would be a black image
    and a latents file of nan, with nothing said."""
    if not all(torch.isfinite(t).all() for t in tensors if t is not None):
        raise InputError(f"{what} came out nan or inf, so nothing was written (a guidance too large, or weights "
                         "holding nan or inf)")


@dataclass
class Result:
    record: Experiment
    latents: torch.Tensor            # [1 + k, 4, h, w] float32, source first
    images: list[Image.Image]        # decoded, one per prompt
    edit: edits.PromptToPrompt       # with its AttentionStore when the plan asked for one
    inversion: Inversion | None      # the photo's, for a photo edit
    photo: Image.Image | None        # the photo as the model saw it


def check_model(sd, record: Experiment):
    """What only the architecture can tell: the blend's resolution and the chosen layers exist at
    this size (a model loaded on the "meta" device is enough)."""
    if record.blend:
        check_resolution(sd, record.height, record.width, record.blend_res, "blend_res (--blend-res)")
    check_sites(sd, record.height, record.width, record.cross_sites, True, "cross_sites (--cross-sites)")
    check_sites(sd, record.height, record.width, record.self_sites, False, "self_sites (--self-sites)",
                record.self_max_tokens)


def run(sd, plan: Plan, dtype: str = "float32", progress: bool = True) -> Result:
    """Sample the plan's record with its edit (from its photo's inversion, for a photo edit)."""
    record, start, inv = plan.record, {}, None
    check_model(sd, record)
    if plan.photo is not None:   # start from the inversion: x_T, null embeddings, direct offsets
        inv = photo.inversion_of(sd, plan.photo, dtype)
        start = inv.start()
    latents = sampler.generate(sd, record.prompts, record.seed, record.steps, record.guidance, record.height,
                               record.width, edit=plan.edit, sampler=record.sampler, progress=progress, **start)
    decoded = sampler.decode(sd, latents)
    check_finite(f"the sampled latents and images (guidance {record.guidance})", latents, decoded)
    images = viz.to_pil(decoded)
    shown = viz.to_pil(plan.photo.image, truncate=False)[0] if plan.photo is not None else None
    return Result(record, latents, images, plan.edit, inv, shown)
