"""The `p2p` command: generate, edit, invert, maps, download. Bad input is one line on stderr and
exit status 2. Photos (`invert`, `edit --image`) are handled in cli_photo.py."""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

from models import InputError
from models.checkpoint import load
from models.text import check_prompts, load_tokenizer

from . import cli_photo, edits, inversion, output, sampler, viz

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_REPO = "CompVis/stable-diffusion-v1-4"   # the checkpoint of the paper's SD figures


class Parser(argparse.ArgumentParser):
    def error(self, message):   # argparse would print the whole usage; one line is enough
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_model_args(p: argparse.ArgumentParser):
    p.add_argument("--weights", type=Path, help="SD v1 checkpoint: a .safetensors file (LDM layout) "
                   "or a diffusers-layout folder (get one with `p2p download`)")
    p.add_argument("--device", choices=["cpu", "cuda", "mps"], help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weights and activations (default float32)")


def add_sampling_args(p: argparse.ArgumentParser):
    p.add_argument("--seed", type=int, default=0, help="seed of the shared initial noise (default 0)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--height", type=int, default=512, help="image height, a multiple of 8 (default 512)")
    p.add_argument("--width", type=int, default=512, help="image width, a multiple of 8 (default 512)")


def add_inversion_args(p: argparse.ArgumentParser):
    p.add_argument("--method", choices=inversion.METHODS, default="null-text", help="inversion: null-text "
                   "(optimised, slow), negative-prompt (no optimisation) or plain ddim (default null-text)")
    p.add_argument("--inner-steps", type=int, default=10, help="null-text: Adam steps per DDIM step at most "
                   "(default 10)")
    p.add_argument("--offsets", default="0,0,0,0", metavar="L,R,T,B", help="pixels to crop off the photo's "
                   "left, right, top and bottom before the centre square (default 0,0,0,0)")


def device_of(name: str | None) -> str:
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available to this torch")
    if name == "mps" and not torch.backends.mps.is_available():
        raise InputError("--device mps: MPS is not available on this machine")
    return name


def check_outputs(*paths: Path | None):
    for path in paths:
        if path is not None and not path.parent.is_dir():
            raise InputError(f"output directory does not exist: {path.parent}")


def load_model(args):
    if args.weights is None:
        raise InputError("no --weights given: pass a .safetensors file or a diffusers folder, "
                         "or fetch the paper's model with `p2p download` (into weights/)")
    device, start = device_of(args.device), time.perf_counter()
    sd = load(args.weights, device, DTYPES[args.dtype])
    print(f"loaded {sd.name} ({args.dtype}, {device}) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return sd


def cmd_generate(args):
    sampler.check_size(args.height, args.width, args.steps)
    check_prompts(load_tokenizer(), args.prompt + [args.negative])   # before the slow load
    check_outputs(args.out, args.latents_out)
    sd = load_model(args)
    latents = sampler.generate(sd, args.prompt, args.seed, args.steps, args.guidance, args.height, args.width,
                               args.negative)
    images = output.to_pil(sampler.decode(sd, latents))
    metadata = {"prompts": json.dumps(args.prompt), "negative": args.negative, "seed": str(args.seed),
                "steps": str(args.steps), "guidance": str(args.guidance),
                "size": f"{args.width}x{args.height}", "checkpoint": sd.name, "software": "p2p generate"}
    if args.latents_out is not None:
        output.save_tensors(args.latents_out, {"latents": latents}, metadata)
    output.save_png(args.out, output.labelled_row(images, args.prompt), metadata)
    print(f"wrote {args.out}", file=sys.stderr)


def window(text: str):
    """"0.8" -> 0.8 (the first 80% of steps); "0.2:0.6" -> (0.2, 0.6)."""
    try:
        parts = [float(x) for x in text.split(":")]
    except ValueError:
        raise InputError(f"not a step window: {text!r} (use F or START:END, fractions of the steps)") from None
    if len(parts) > 2 or not all(0 <= x <= 1 for x in parts):
        raise InputError(f"not a step window: {text!r} (use F or START:END, fractions in [0, 1])")
    return parts[0] if len(parts) == 1 else tuple(parts)


def pairs(items: list[str], what: str, value) -> dict:
    """["cat=0.4", ...] -> {"cat": value("0.4"), ...}."""
    out = {}
    for item in items:
        word, sep, v = item.rpartition("=")
        if not sep or not word:
            raise InputError(f"{what} takes WORD=VALUE, got {item!r}")
        try:
            out[word] = value(v)
        except ValueError:
            raise InputError(f"{what}: not a number in {item!r}") from None
    return out


def build_edit(args, tokenizer):
    """The PromptToPrompt edit the flags describe; every word is checked here, before any sampling."""
    prompts = [args.source, *args.target]
    scales = pairs(args.reweight, "--reweight", float)
    if args.mode == "replace":
        cross = edits.Replace(tokenizer, prompts)
    elif args.mode == "refine":
        cross = edits.Refine(tokenizer, prompts)
    else:
        if not scales:
            raise InputError("--mode reweight needs at least one --reweight WORD=SCALE")
        cross = None
    if scales:
        cross = edits.Reweight(tokenizer, prompts, scales, prev=cross)
    cross_steps = {"default": window(args.cross_steps), **pairs(args.word_steps, "--word-steps", window)}
    blend = None
    if args.blend:
        words = [[w for w in group.split(",") if w] for group in args.blend]
        blend = edits.LocalBlend(tokenizer, prompts, words, args.blend_threshold, args.blend_res)
    return edits.PromptToPrompt(tokenizer, prompts, args.steps, cross, cross_steps, window(args.self_steps),
                                args.self_max_tokens, blend,
                                edits.AttentionStore() if args.maps_out else None)


def cmd_edit(args, sd=None):
    """`p2p edit`; `sd` is an already loaded model (scripts/reproduce_paper.py runs many edits)."""
    prompts = [args.source, *args.target]
    sampler.check_size(args.height, args.width, args.steps)
    tokenizer = load_tokenizer()
    check_prompts(tokenizer, prompts)
    edit = build_edit(args, tokenizer)
    check_outputs(args.out, args.latents_out, args.maps_out)
    if args.inversion is not None and args.image is None:
        raise InputError("--inversion needs the --image it was made from")
    photo, inv = cli_photo.prepare(args) if args.image is not None else (None, None)
    sd = sd or load_model(args)
    if edit.blend is not None:
        check_resolution(sd, args, args.blend_res, "--blend-res")
    if args.maps_out is not None:
        check_resolution(sd, args, 16, "--maps-out reads resolution")
    start = {}
    if photo is not None:   # start from the photo's inversion, its null embeddings in every prompt's guidance
        inv = cli_photo.photo_inversion(sd, args, photo, inv)
        start = {"x_T": inv.x_T, "null_embeddings": inv.null_embeddings}
    latents = sampler.generate(sd, prompts, args.seed, args.steps, args.guidance, args.height, args.width,
                               edit=edit, **start)
    images = output.to_pil(sampler.decode(sd, latents))
    metadata = {"source": args.source, "targets": json.dumps(args.target), "mode": args.mode,
                "cross_steps": args.cross_steps, "word_steps": json.dumps(args.word_steps),
                "self_steps": args.self_steps, "self_max_tokens": str(args.self_max_tokens),
                "blend": json.dumps(args.blend), "blend_threshold": str(args.blend_threshold),
                "blend_res": str(args.blend_res), "reweight": json.dumps(args.reweight), "seed": str(args.seed),
                "steps": str(args.steps), "guidance": str(args.guidance), "size": f"{args.width}x{args.height}",
                "checkpoint": sd.name, "software": "p2p edit"}
    row, labels = images, prompts
    if photo is not None:   # the photo first, then its reconstruction (the source row) and the edits
        metadata |= {"image": str(args.image), "inversion_method": inv.settings["method"]}
        row, labels = output.to_pil(photo) + images, ["photo", *prompts]
        cli_photo.report_latents(inv, latents)
    if args.latents_out is not None:
        output.save_tensors(args.latents_out, {"latents": latents}, metadata)
    if args.maps_out is not None:
        output.save_png(args.maps_out, viz.token_maps_grid(images, prompts, edit.store, tokenizer), metadata)
    output.save_png(args.out, output.labelled_row(row, labels), metadata)
    print(f"wrote {args.out}", file=sys.stderr)


def steps_range(text: str, steps: int) -> tuple[int, int]:
    """"a:b" -> (a, b), the half-open range of step indices; "" -> every step."""
    if not text:
        return 0, steps
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise InputError(f"--steps-range takes START:END step indices, got {text!r}") from None
    if not 0 <= a < b <= steps:
        raise InputError(f"--steps-range {text}: need 0 <= START < END <= {steps}")
    return a, b


def check_resolution(sd, args, res: int, what: str):
    """Fail before sampling when no down/up cross-attention runs at `res` for this image size."""
    have = sorted({edits.side(s) for s in sd.unet.sites(args.height // 8, args.width // 8)
                   if s.is_cross and s.place != "mid"}, reverse=True)
    if res not in have:
        raise InputError(f"{what} {res}: at {args.width}x{args.height} this model has down/up "
                         f"cross-attention at resolutions {have} only")


def cmd_maps(args):
    sampler.check_size(args.height, args.width, args.steps)
    tokenizer = load_tokenizer()
    check_prompts(tokenizer, [args.prompt])
    window = steps_range(args.steps_range, args.steps)
    if args.components < 0:
        raise InputError(f"--components must be 0 or more (got {args.components})")
    check_outputs(args.out)
    sd = load_model(args)
    check_resolution(sd, args, args.res, "--res")
    store = edits.AttentionStore(edits.Sites(places=("down", "up"), resolutions=(args.res,),
                                             self=args.components > 0, steps=window))
    latents = sampler.generate(sd, [args.prompt], args.seed, args.steps, args.guidance, args.height, args.width,
                               edit=store)
    images = output.to_pil(sampler.decode(sd, latents))
    metadata = {"prompt": args.prompt, "res": str(args.res), "steps_range": f"{window[0]}:{window[1]}",
                "seed": str(args.seed), "steps": str(args.steps), "guidance": str(args.guidance),
                "size": f"{args.width}x{args.height}", "checkpoint": sd.name, "software": "p2p maps"}
    grid = viz.token_maps_grid(images, [args.prompt], store, tokenizer, args.res)
    if args.components:
        parts = viz.self_components(store, args.res, args.components)
        grid = viz.stack([grid, output.labelled_row(parts, [f"self-attention component {i + 1}"
                                                            for i in range(len(parts))])])
    output.save_png(args.out, grid, metadata)
    print(f"wrote {args.out}", file=sys.stderr)


def cmd_invert(args):
    sampler.check_size(args.size, args.size, args.steps)
    cli_photo.check_settings(args.method, args.steps, args.inner_steps, args.size)
    check_prompts(load_tokenizer(), [args.prompt])
    check_outputs(args.out)
    image = inversion.load_image(args.image, args.size, cli_photo.offsets(args.offsets))
    sd = load_model(args)
    inv = cli_photo.invert_photo(sd, args, image, args.prompt)
    cli_photo.report(sd, inv, cli_photo.reconstruct(sd, inv))
    inversion.save(args.out, inv)
    print(f"wrote {args.out}", file=sys.stderr)


def cmd_download(args):
    from .download import download
    print(download(args.repo, args.dir, fp16=args.fp16, revision=args.revision))


def parser() -> argparse.ArgumentParser:
    root = Parser(prog="p2p", description="Prompt-to-Prompt image editing on Stable Diffusion v1.")
    commands = root.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = commands.add_parser("generate", help="text to image, one shared noise for all prompts")
    add_model_args(p)
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    p.add_argument("--negative", default="", help='unconditional prompt of guidance (default "")')
    add_sampling_args(p)
    p.add_argument("--out", type=Path, required=True, help="PNG: the images side by side, labelled")
    p.add_argument("--latents-out", type=Path, help="safetensors: final latents [n_prompts, 4, H/8, W/8]")
    p.set_defaults(run=cmd_generate)

    p = commands.add_parser("edit", help="Prompt-to-Prompt: edit a source prompt's image into target prompts")
    add_model_args(p)
    p.add_argument("--source", required=True, help="the source prompt")
    p.add_argument("--target", action="append", required=True, help="a target prompt; repeat for several")
    p.add_argument("--mode", choices=["replace", "refine", "reweight"], required=True,
                   help="replace: swap words (same word count); refine: add words; reweight: scale words")
    p.add_argument("--cross-steps", default="0.8", help="fraction (or START:END) of steps with cross-attention "
                   "replacement (default 0.8)")
    p.add_argument("--word-steps", nargs="+", action="extend", default=[], metavar="WORD=F",
                   help="a cross-attention window for one word of the targets (F or START:END)")
    p.add_argument("--self-steps", default="0.4", help="fraction (or START:END) of steps with self-attention "
                   "injection (default 0.4)")
    p.add_argument("--self-max-tokens", type=int, default=256, help="inject self-attention only in layers "
                   "with at most this many keys (default 256 = 16x16)")
    p.add_argument("--blend", nargs="+", action="extend", default=[], metavar="WORDS",
                   help="local blend: one comma-separated word list per prompt, source first")
    p.add_argument("--blend-threshold", type=float, default=0.3, help="local blend mask threshold (default 0.3)")
    p.add_argument("--blend-res", type=int, default=16, help="resolution of the cross-attention maps local "
                   "blend reads (default 16, the paper's choice at 512 px)")
    p.add_argument("--reweight", nargs="+", action="extend", default=[], metavar="WORD=SCALE",
                   help="scale a target word's attention (negative allowed); stacks on replace/refine")
    add_sampling_args(p)
    p.add_argument("--out", type=Path, required=True, help="PNG: source and targets side by side, labelled")
    p.add_argument("--latents-out", type=Path, help="safetensors: final latents [1 + n_targets, 4, H/8, W/8]")
    p.add_argument("--maps-out", type=Path, help="PNG: per-token cross-attention maps of every prompt")
    p.add_argument("--image", type=Path, help="edit this photo (--source describes it) instead of sampling from "
                   "--seed; square, --height = --width")
    p.add_argument("--inversion", type=Path, help="the photo's inversion from `p2p invert`, which fixes the "
                   "method, inner steps and offsets (default: invert first, keeping the result as "
                   "OUT_DIR/PHOTO.inversion.safetensors for the next edit)")
    add_inversion_args(p)
    p.set_defaults(run=cmd_edit)

    p = commands.add_parser("invert", help="invert a photo for editing: x_T and per-step null embeddings")
    add_model_args(p)
    p.add_argument("--image", type=Path, required=True, help="the photo: any image Pillow reads")
    p.add_argument("--prompt", required=True, help="a caption of the photo; edit it later with --source PROMPT")
    add_inversion_args(p)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="the guidance the photo will be edited at "
                   "(default 7.5)")
    p.add_argument("--size", type=int, default=512, help="model image size: the photo is centre-cropped to a "
                   "square and resized to it (default 512)")
    p.add_argument("--out", type=Path, required=True, help="safetensors: x_T, z0, null_embeddings, settings")
    p.set_defaults(run=cmd_invert)

    p = commands.add_parser("maps", help="per-token cross-attention maps over the generated image")
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--res", type=int, default=16, help="resolution of the maps averaged (default 16)")
    p.add_argument("--steps-range", default="", metavar="A:B", help="average over steps A..B-1 (default all)")
    add_sampling_args(p)
    p.add_argument("--out", type=Path, required=True, help="PNG: the image, then one map per token")
    p.add_argument("--components", type=int, default=0, metavar="N",
                   help="also draw the top N principal components of self-attention at --res")
    p.set_defaults(run=cmd_maps)

    p = commands.add_parser("download", help="fetch a diffusers-layout SD v1 repository (safetensors only)")
    p.add_argument("--repo", default=DEFAULT_REPO, help=f"repository id (default {DEFAULT_REPO})")
    p.add_argument("--dir", type=Path, default=Path("weights"), help="where to put it (default weights/)")
    p.add_argument("--fp16", action="store_true", help="take the fp16 weight files where the repository has them")
    p.add_argument("--revision", help="branch, tag or commit")
    p.set_defaults(run=cmd_download)
    return root


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except InputError as e:
        print(f"p2p {args.command}: error: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:
        print(f"p2p {args.command}: error: out of memory; try --dtype float16 or a smaller size", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"p2p {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
