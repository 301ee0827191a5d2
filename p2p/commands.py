"""What each `p2p` command does once cli.py has parsed its flags.

Every command first checks all it can without the model (sizes, prompts, words, the photo,
every output path), so bad input costs no loading or sampling; then it loads the model,
samples and writes. Photos (`invert`, `edit --image`) have their parts in cli_photo.py.
"""
import json
import sys
import time
from pathlib import Path

import torch

from models import InputError
from models.checkpoint import check_device, fingerprint, load
from models.text import check_prompts, load_tokenizer

from . import cli_photo, edits, inversion, output, sampler, viz

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def text(value) -> str:
    """A metadata value as JSON, UTF-8 rather than \\u escapes."""
    return json.dumps(value, ensure_ascii=False)


# ---- before the model: outputs and the device ------------------------------------------

def check_outputs(outputs: dict[str, tuple[Path | None, str]], inputs: dict[str, Path | None]):
    """Each output ({flag: (path, "image" | "tensors")}) writable under a known suffix, no two of
    them the same file and none of them an input ({flag: path}): p2p never overwrites those."""
    seen = {}
    for flag, (path, kind) in outputs.items():
        if path is None:
            continue
        output.check_output(path, kind)
        real = path.resolve()
        if real in seen:
            raise InputError(f"{seen[real]} and {flag} are the same file ({path}): each output needs its own")
        for name, source in inputs.items():
            if source is not None and real == source.resolve():
                raise InputError(f"{flag} {path} is the {name} input: p2p never overwrites its inputs")
        seen[real] = flag


def device_of(name: str | None) -> str:
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_device(name)
    return name


def load_model(args):
    device, start = device_of(args.device), time.perf_counter()
    if args.dtype == "float16" and device == "cpu":
        print("note: float16 on a CPU is no faster than float32 and can be far slower (about 15x on CPUs "
              "without float16 arithmetic); --dtype bfloat16 is the fast half precision on CPUs", file=sys.stderr)
    sd = load(args.weights, device, DTYPES[args.dtype])
    print(f"loaded {sd.name} ({args.dtype}, {device}) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return sd


def run_metadata(args, sd, height: int, width: int) -> dict[str, str]:
    """What every output records of how it was made (sizes are WIDTHxHEIGHT everywhere)."""
    return {"seed": str(args.seed), "steps": str(args.steps), "guidance": str(args.guidance),
            "size": f"{width}x{height}", "sampler": args.sampler, "checkpoint": sd.name,
            "checkpoint_fingerprint": sd.fingerprint, "dtype": args.dtype, "device": str(sd.device),
            "software": f"p2p {args.command}"}


def wrote(path: Path):
    print(f"wrote {path}", file=sys.stderr)


# ---- p2p generate ----------------------------------------------------------------------

def generate(args, sd=None):
    """`p2p generate`; `sd` is an already loaded model (scripts/reproduce_paper.py runs many)."""
    sampler.check_size(args.height, args.width, args.steps)
    check_prompts(load_tokenizer(), args.prompt + [args.negative])   # before the slow load
    check_outputs({"--out": (args.out, "image"), "--latents-out": (args.latents_out, "tensors")},
                  {"--weights": args.weights})
    sd = sd or load_model(args)
    latents = sampler.generate(sd, args.prompt, args.seed, args.steps, args.guidance, args.height, args.width,
                               args.negative, sampler=args.sampler)
    images = output.to_pil(sampler.decode(sd, latents))
    metadata = {"prompts": text(args.prompt), "negative": args.negative, **run_metadata(args, sd, args.height,
                                                                                         args.width)}
    if args.latents_out is not None:
        output.save_tensors(args.latents_out, {"latents": latents}, metadata)
        wrote(args.latents_out)
    output.save_image(args.out, output.labelled_row(images, args.prompt), metadata)
    wrote(args.out)


# ---- p2p edit --------------------------------------------------------------------------

def build_edit(args, tokenizer):
    """The PromptToPrompt edit the flags describe; every word is checked here, before any sampling."""
    prompts = [args.source, *args.target]
    if args.mode == "replace":
        cross = edits.Replace(tokenizer, prompts, official=args.replace_mapper == "official")
    elif args.mode == "refine":
        cross = edits.Refine(tokenizer, prompts)
    else:
        if not args.reweight:
            raise InputError("--mode reweight needs at least one --reweight WORD=SCALE")
        cross = None
    if args.reweight:
        cross = edits.Reweight(tokenizer, prompts, args.reweight, prev=cross)
    if args.replace_mapper != "aligned" and args.mode != "replace":
        raise InputError(f"--replace-mapper is the word swap's; --mode {args.mode} has no replace mapper")
    blend = None
    words = lambda groups: [[w for w in group.split(",") if w] for group in groups]
    if args.blend:
        blend = edits.LocalBlend(tokenizer, prompts, words(args.blend), args.blend_threshold, args.blend_res,
                                 subtract=words(args.blend_subtract) or None,
                                 start=int(args.blend_start * args.steps))
    elif args.blend_subtract or args.blend_start:
        raise InputError("--blend-subtract and --blend-start shape a local blend: give --blend WORDS too")
    return edits.PromptToPrompt(tokenizer, prompts, args.steps, cross, {"default": args.cross_steps,
                                                                        **args.word_steps},
                                args.self_steps, args.self_max_tokens, blend,
                                edits.AttentionStore() if args.maps_out else None)


def check_resolution(sd, height: int, width: int, res: int, what: str):
    """Fail before sampling when no down/up cross-attention runs at `res` for this image size."""
    have = sorted({edits.side(s) for s in sd.unet.sites(height // 8, width // 8)
                   if s.is_cross and s.place != "mid"}, reverse=True)
    if res not in have:
        raise InputError(f"{what} {res}: at {width}x{height} this model has down/up "
                         f"cross-attention at resolutions {have} only")


def edit(args, sd=None):
    """`p2p edit`; `sd` is an already loaded model (scripts/reproduce_paper.py runs many edits)."""
    prompts = [args.source, *args.target]
    sampler.check_size(args.height, args.width, args.steps)
    tokenizer = load_tokenizer()
    check_prompts(tokenizer, prompts)
    edit = build_edit(args, tokenizer)
    if args.inversion is not None and args.image is None:
        raise InputError("--inversion needs the --image it was made from")
    if args.image is not None and args.sampler != "ddim":
        raise InputError(f"--sampler {args.sampler} cannot edit a photo: its inversion walks DDIM's steps "
                         "backwards, so the edit must sample them forwards with --sampler ddim")
    photo = cli_photo.prepare(args) if args.image is not None else None
    check_outputs({"--out": (args.out, "image"), "--latents-out": (args.latents_out, "tensors"),
                   "--maps-out": (args.maps_out, "image"),
                   "the inversion cache": (photo.cache if photo is not None and photo.inversion is None else None,
                                           "tensors")},
                  {"--weights": args.weights, "--image": args.image, "--inversion": args.inversion})
    sd = sd or load_model(args)
    if edit.blend is not None:
        check_resolution(sd, args.height, args.width, args.blend_res, "--blend-res")
    if args.maps_out is not None:
        check_resolution(sd, args.height, args.width, args.maps_res, "--maps-res")
    start = {}
    if photo is not None:   # start from the photo's inversion, its null embeddings in every prompt's guidance
        inv = cli_photo.photo_inversion(sd, args, photo)
        start = {"x_T": inv.x_T, "null_embeddings": inv.null_embeddings}
    latents = sampler.generate(sd, prompts, args.seed, args.steps, args.guidance, args.height, args.width,
                               edit=edit, sampler=args.sampler, **start)
    images = output.to_pil(sampler.decode(sd, latents))
    metadata = {"source": args.source, "targets": text(args.target), "mode": args.mode,
                "cross_steps": text(args.cross_steps), "word_steps": text(args.word_steps),
                "self_steps": text(args.self_steps), "self_max_tokens": str(args.self_max_tokens),
                "blend": text(args.blend), "blend_threshold": str(args.blend_threshold),
                "blend_res": str(args.blend_res), "blend_start": str(args.blend_start),
                "blend_subtract": text(args.blend_subtract), "replace_mapper": args.replace_mapper,
                "reweight": text(args.reweight),
                **run_metadata(args, sd, args.height, args.width)}
    row, labels = images, prompts
    if photo is not None:   # the photo first, then its reconstruction (the source row) and the edits
        metadata |= {"image": str(args.image), "inversion_method": inv.settings["method"]}
        row, labels = output.to_pil(photo.image, truncate=False) + images, ["photo", *prompts]
        cli_photo.report_latents(inv, latents)
    if args.latents_out is not None:
        output.save_tensors(args.latents_out, {"latents": latents}, metadata)
        wrote(args.latents_out)
    if args.maps_out is not None:
        grid = viz.token_maps_grid(images, prompts, edit.store, tokenizer, args.maps_res)
        output.save_image(args.maps_out, grid, metadata | {"maps_res": str(args.maps_res)})
        wrote(args.maps_out)
    output.save_image(args.out, output.labelled_row(row, labels), metadata)
    wrote(args.out)


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
    sampler.check_size(args.height, args.width, args.steps)
    tokenizer = load_tokenizer()
    check_prompts(tokenizer, [args.prompt])
    window = steps_range(args.steps_range, sampler.calls(args.sampler, args.steps))
    check_outputs({"--out": (args.out, "image")}, {"--weights": args.weights})
    sd = sd or load_model(args)
    check_resolution(sd, args.height, args.width, args.res, "--res")
    store = edits.AttentionStore(edits.Sites(places=("down", "up"), resolutions=(args.res,),
                                             self=args.components > 0, steps=window))
    latents = sampler.generate(sd, [args.prompt], args.seed, args.steps, args.guidance, args.height, args.width,
                               edit=store, sampler=args.sampler)
    images = output.to_pil(sampler.decode(sd, latents))
    metadata = {"prompt": args.prompt, "res": str(args.res), "steps_range": f"{window[0]}:{window[1]}",
                "components": str(args.components), **run_metadata(args, sd, args.height, args.width)}
    grid = viz.token_maps_grid(images, [args.prompt], store, tokenizer, args.res)
    if args.components:
        grid = viz.stack([grid, viz.components_grid(viz.self_components(store, args.res, args.components))])
    output.save_image(args.out, grid, metadata)
    wrote(args.out)


# ---- p2p invert, p2p download ----------------------------------------------------------

def invert(args):
    sampler.check_size(args.size, args.size, args.steps)
    cli_photo.check_settings(args.method, args.steps, args.size)
    check_prompts(load_tokenizer(), [args.prompt])
    check_outputs({"--out": (args.out, "tensors")}, {"--weights": args.weights, "--image": args.image})
    image = cli_photo.load_photo(args, args.size)
    want = cli_photo.settings(args, args.prompt, args.size, args.weights, fingerprint(args.weights),
                              inversion.file_hash(args.image))
    sd = load_model(args)
    inv = cli_photo.invert_photo(sd, args, image, want)
    cli_photo.report(sd, inv, cli_photo.reconstruct(sd, inv))
    inversion.save(args.out, inv, {"dtype": args.dtype, "device": str(sd.device)})
    wrote(args.out)


def download(args):
    from .download import download   # huggingface_hub, only for this command
    print(download(args.repo, args.dir, fp16=args.fp16, revision=args.revision))
