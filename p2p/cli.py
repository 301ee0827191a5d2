"""The `p2p` command: generate, edit, invert, maps, sites, sweep, bench, download.

This file parses and checks the flags; p2p/commands.py does the work. It imports only the
standard library, so `--help` and usage errors are instant and Ctrl-C while torch loads is
one line. Bad input is one line on stderr and exit status 2.
"""
import argparse
import math
import os
import sys
from pathlib import Path

DTYPES = ("float32", "float16", "bfloat16")
SAMPLERS = ("ddim", "plms")                          # p2p/sampler.py's
METHODS = ("null-text", "negative-prompt", "ddim", "direct")   # p2p/inversion.py's, kept here to stay light
PREDICTIONS = ("epsilon", "v_prediction")            # models/checkpoint.py's
PIE_METHODS = ("ddim", "null-text", "negative-prompt", "direct")   # p2p/eval/pie.py's order
DEFAULT_REPO = "CompVis/stable-diffusion-v1-4"       # the checkpoint of the paper's SD figures
MAX_SEED = 2 ** 64 - 1                               # torch.Generator.manual_seed's range


class Once(argparse.Action):
    """Store a flag's value, refusing the flag a second time (argparse would keep the last)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, f"_{self.dest}_given", False):
            parser.error(f"{option_string} given twice")
        setattr(namespace, f"_{self.dest}_given", True)
        setattr(namespace, self.dest, values)


class Parser(argparse.ArgumentParser):
    def error(self, message):   # argparse would print the whole usage; one line is enough
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def add_argument(self, *names, **kwargs):
        if "action" not in kwargs and names[0].startswith("--"):
            kwargs["action"] = Once
        return super().add_argument(*names, **kwargs)


# ---- values of flags: each refuses what it cannot take, in one line ---------------------

def finite(text: str) -> float:
    """A float flag: nan and inf are refused (they would sample black images without a word)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def path(text: str) -> Path:
    """A file or folder flag: "" is refused (Path("") would quietly be the working directory)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path")
    return Path(text)


def seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"seeds are 0 to 2**64-1, got {text}")
    return value


def fraction(text: str) -> float:
    value = finite(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"a fraction of the steps lies in [0, 1], got {text}")
    return value


def window(text: str) -> float | tuple[float, float]:
    """"0.8" -> 0.8 (the first 80% of steps); "0.2:0.6" -> (0.2, 0.6)."""
    try:
        parts = [finite(x) for x in text.split(":")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"not a step window: {text!r} (use F or START:END, fractions "
                                         "of the steps)") from None
    if len(parts) > 2:
        raise argparse.ArgumentTypeError(f"not a step window: {text!r} has {len(parts)} parts (use F or START:END)")
    if not all(0 <= x <= 1 for x in parts):
        raise argparse.ArgumentTypeError(f"not a step window: {text!r} (fractions of the steps lie in [0, 1])")
    if len(parts) == 2 and parts[0] > parts[1]:
        raise argparse.ArgumentTypeError(f"step window {text!r} ends before it starts")
    return parts[0] if len(parts) == 1 else tuple(parts)


def pairs(items: list[str], flag: str, value) -> dict:
    """["cat=0.4", ...] -> {"cat": value("0.4"), ...}; a word given twice is refused."""
    out = {}
    for item in items:
        word, sep, v = item.rpartition("=")
        if not sep or not word:
            raise argparse.ArgumentTypeError(f"{flag} takes WORD=VALUE, got {item!r}")
        if word in out:
            raise argparse.ArgumentTypeError(f"{flag}: {word!r} given twice")
        try:
            out[word] = value(v)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{flag} {item}: {e}") from None
    return out


def at_least(low: int):
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return check


def names(allowed):
    """A comma-separated list of names from `allowed`, each once."""
    def check(text: str) -> list[str]:
        items = text.split(",")
        bad = next((i for i in items if i not in allowed), None)
        if bad is not None:
            raise argparse.ArgumentTypeError(f"{bad!r} is not one of {', '.join(allowed)}")
        if len(set(items)) < len(items):
            raise argparse.ArgumentTypeError(f"a name given twice in {text!r}")
        return items
    return check


def numbers(low: int, high: int):
    """A comma-separated list of distinct integers in low..high."""
    def check(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"comma-separated integers, got {text!r}") from None
        if not all(low <= v <= high for v in values) or len(set(values)) < len(values):
            raise argparse.ArgumentTypeError(f"distinct integers from {low} to {high}, got {text!r}")
        return values
    return check


# ---- the parser ------------------------------------------------------------------------

def add_model_args(p: argparse.ArgumentParser):
    p.add_argument("--weights", type=path, required=True, help="SD v1 or 2.x checkpoint: a .safetensors file "
                   "(LDM layout) or a diffusers-layout folder (get one with `p2p download`)")
    p.add_argument("--device", choices=["cpu", "cuda", "mps"], help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and activations (default "
                   "float32; on a CPU, bfloat16 is the fast half precision, float16 is very slow)")
    add_prediction_arg(p)


def add_prediction_arg(p: argparse.ArgumentParser):
    p.add_argument("--prediction", choices=PREDICTIONS, help="what the UNet predicts (default: a diffusers "
                   "folder's scheduler config, else epsilon); an SD 2.x single file cannot say: v_prediction for "
                   "SD 2.0 / 2.1 at 768 px, epsilon for the -base models at 512 px")


def add_sampling_args(p: argparse.ArgumentParser):
    p.add_argument("--seed", type=seed, default=0, help="seed of the shared initial noise, 0 to 2**64-1 "
                   "(default 0)")
    p.add_argument("--steps", type=at_least(1), default=50, help="sampling steps, 1 to 1000 (default 50)")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="ddim (default), or plms: the official "
                   "SD notebook's scheduler (PNDM without Runge-Kutta steps), N + 1 UNet calls for N steps")
    p.add_argument("--guidance", type=finite, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--height", type=at_least(8), default=512, help="image height, a multiple of 8 (default: "
                   "the model's native size, 512, or 768 for SD 2 at 768 px)")
    p.add_argument("--width", type=at_least(8), default=512, help="image width, a multiple of 8 (default: the "
                   "model's native size)")


def add_inversion_args(p: argparse.ArgumentParser):
    p.add_argument("--method", choices=METHODS, default="null-text", help="inversion: null-text "
                   "(optimised, slow), negative-prompt (no optimisation), plain ddim, or direct (DDIM inversion "
                   "whose trajectory the edit's source row follows back to the photo; default null-text)")
    p.add_argument("--inner-steps", type=at_least(1), default=10, help="null-text: Adam steps per DDIM step "
                   "at most (default 10)")
    p.add_argument("--offsets", default="0,0,0,0", metavar="L,R,T,B", help="pixels to crop off the photo's "
                   "left, right, top and bottom before the centre square (default 0,0,0,0)")


def parser() -> argparse.ArgumentParser:
    root = Parser(prog="p2p", description="Prompt-to-Prompt image editing on Stable Diffusion v1 and 2.x.")
    commands = root.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = commands.add_parser("generate", help="text to image, one shared noise for all prompts")
    add_model_args(p)
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    p.add_argument("--negative", default="", help='unconditional prompt of guidance (default "")')
    add_sampling_args(p)
    p.add_argument("--out", type=path, required=True, help="image (.png with the settings as metadata, "
                   ".jpg, .webp): the images side by side, labelled")
    p.add_argument("--latents-out", type=path, help="safetensors: final latents [n_prompts, 4, H/8, W/8]")

    p = commands.add_parser("edit", help="Prompt-to-Prompt: edit a source prompt's image into target prompts")
    add_model_args(p)
    p.add_argument("--recipe", type=path, help="re-run an earlier result exactly: its image or latents file "
                   "(or a JSON experiment record); the edit's flags given with it change single fields")
    p.add_argument("--source", help="the source prompt (required without --recipe)")
    p.add_argument("--target", action="append", default=[], help="a target prompt; repeat for several")
    p.add_argument("--mode", choices=["replace", "refine", "reweight"],
                   help="replace: swap words (same word count); refine: add words; reweight: scale words")
    p.add_argument("--cross-steps", type=window, default=0.8, help="fraction (or START:END) of steps with "
                   "cross-attention replacement (default 0.8)")
    p.add_argument("--word-steps", nargs="+", action="extend", default=[], metavar="WORD=F",
                   help="a cross-attention window for one word of the targets (F or START:END)")
    p.add_argument("--self-steps", type=window, default=0.4, help="fraction (or START:END) of steps with "
                   "self-attention injection (default 0.4)")
    p.add_argument("--self-max-tokens", type=at_least(0), default=256, help="inject self-attention only in "
                   "layers with at most this many keys (default 256 = 16x16 at 512 px; (H/32)x(W/32) for a model native to "
                   "another size)")
    p.add_argument("--blend", nargs="+", action="extend", default=[], metavar="WORDS",
                   help="local blend: one comma-separated word list per prompt, source first")
    p.add_argument("--blend-threshold", type=finite, default=0.3, help="local blend mask threshold "
                   "(default 0.3)")
    p.add_argument("--blend-res", type=at_least(1), default=16, help="resolution of the cross-attention maps "
                   "local blend reads (default 16, the paper's choice at 512 px; the short side / 32 for a model native "
                   "to another size)")
    p.add_argument("--blend-start", type=fraction, default=0.0, metavar="F", help="blend only from update "
                   "int(F * steps) on (default 0, every update; the null-text notebook uses 0.2)")
    p.add_argument("--blend-subtract", nargs="+", action="extend", default=[], metavar="WORDS",
                   help="local blend: remove these words' regions from the mask; one comma-separated list "
                   "per prompt, source first (the null-text notebook's substruct_words)")
    p.add_argument("--blend-mask", type=path, metavar="MASK", help="local blend inside a region you drew instead "
                   "of words' attention: an image whose bright pixels (> 127) mark it, resized to the latents; "
                   "where it has alpha, transparent pixels are outside")
    p.add_argument("--replace-mapper", choices=["aligned", "official"], default="aligned",
                   help="replace: aligned (default) keeps the tokens after a swapped word aligned; official "
                   "is the authors' mapper, which shifts them when the swapped words' token counts differ (on our "
                   "word split: for a '#' inside a word, a combining accent or two spaces in a row theirs splits "
                   "words differently, so it then differs from their exact mapper)")
    p.add_argument("--reweight", nargs="+", action="extend", default=[], metavar="WORD=SCALE",
                   help="scale a target word's attention (negative allowed); stacks on replace/refine")
    p.add_argument("--cross-sites", default="", metavar="ITEMS", help="the layers the cross edit acts in: "
                   "comma-separated PLACE:SIDE, PLACE down, mid, up or any, SIDE the short side of the feature "
                   "map (16 for 16x16 at 512 px) or any; `p2p sites` lists them (default: every layer)")
    p.add_argument("--self-sites", default="", metavar="ITEMS", help="the layers of the self-attention "
                   "injection, as --cross-sites; --self-max-tokens applies on top (default: every layer)")
    add_sampling_args(p)
    p.add_argument("--out", type=path, required=True, help="image (.png, .jpg, .webp): source and targets "
                   "side by side, labelled")
    p.add_argument("--latents-out", type=path, help="safetensors: final latents [1 + n_targets, 4, H/8, W/8]")
    p.add_argument("--maps-out", type=path, help="image: per-token cross-attention maps of every prompt")
    p.add_argument("--maps-res", type=at_least(1), default=16, help="resolution of the maps --maps-out "
                   "draws (default 16; the short side / 32 for a model native to another size)")
    p.add_argument("--image", type=path, help="edit this photo (--source describes it) instead of sampling from "
                   "--seed; square, --height = --width")
    p.add_argument("--inversion", type=path, help="the photo's inversion from `p2p invert`, which fixes the "
                   "method, inner steps and offsets (default: invert first, keeping the result as "
                   "OUT_DIR/PHOTO.KEY.inversion.safetensors, KEY a hash of the settings, for the next edit)")
    add_inversion_args(p)

    p = commands.add_parser("invert", help="invert a photo for editing: x_T and per-step null embeddings")
    add_model_args(p)
    p.add_argument("--image", type=path, required=True, help="the photo: any image Pillow reads")
    p.add_argument("--prompt", required=True, help="a caption of the photo; edit it later with --source PROMPT")
    add_inversion_args(p)
    p.add_argument("--steps", type=at_least(1), default=50, help="DDIM steps (default 50)")
    p.add_argument("--guidance", type=finite, default=7.5, help="the guidance the photo will be edited at "
                   "(default 7.5)")
    p.add_argument("--size", type=at_least(8), default=512, help="model image size: the photo is "
                   "centre-cropped to a square and resized to it (default: the model's native size, 512, or 768 for SD 2 at "
                   "768 px)")
    p.add_argument("--out", type=path, required=True, help="safetensors: x_T, z0, null_embeddings or "
                   "trajectory, settings")

    p = commands.add_parser("maps", help="per-token cross-attention maps over the generated image")
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the prompt whose image and token maps are drawn")
    p.add_argument("--res", type=at_least(1), default=16, help="resolution of the maps averaged (default 16; "
                   "the short side / 32 for a model native to another size)")
    p.add_argument("--steps-range", default="", metavar="A:B", help="average over steps A..B-1 (UNet calls "
                   "under plms; default all)")
    p.add_argument("--sites", default="", metavar="ITEMS", help="average only these layers at --res, "
                   "PLACE:SIDE items as edit's --cross-sites (default: the down and up blocks)")
    add_sampling_args(p)
    p.add_argument("--out", type=path, required=True, help="image: the image, then one map per token")
    p.add_argument("--components", type=at_least(0), default=0, metavar="N",
                   help="also draw the top N principal components of self-attention at --res")

    p = commands.add_parser("sweep", help="a grid of edits from a JSON spec: results, tables, contact sheets")
    p.add_argument("spec", type=Path, help="the sweep spec: base record, cases, axes (see the README's Ablations)")
    p.add_argument("--weights", type=Path, help="SD v1 or 2.x checkpoint (not needed with --report)")
    p.add_argument("--device", choices=["cpu", "cuda", "mps"], help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and activations (default float32)")
    add_prediction_arg(p)
    p.add_argument("--out", type=Path, required=True, help="the sweep's folder: results*.jsonl, results.csv, "
                   "summary.md, sheet-AXIS.png, cells/ (made if missing; a rerun resumes)")
    p.add_argument("--shard", metavar="K/N", help="run cell i only if i %% N == K (default: RANK/WORLD_SIZE or "
                   "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT from the environment, else all)")
    p.add_argument("--base", nargs="+", action="extend", default=[], metavar="FIELD=VALUE",
                   help="change a base field of every cell (a JSON value, or text), e.g. steps=10 height=256")
    p.add_argument("--report", action="store_true", help="only rebuild results.csv, summary.md and the sheets "
                   "from the results so far")
    p.add_argument("--clip", type=Path, default=Path("weights/openai--clip-vit-large-patch14"), help="CLIP for the "
                   "CLIP score and direction (default weights/openai--clip-vit-large-patch14; skipped if absent)")
    p.add_argument("--dino", type=Path, default=Path("weights/facebook--dino-vitb8"), help="DINO ViT-B/8 for the "
                   "structure distance (default weights/facebook--dino-vitb8; skipped if absent)")

    p = commands.add_parser("bench", help="benchmarks: pie, PIE-Bench's 700 photos inverted, edited and scored")
    benches = p.add_subparsers(dest="bench", required=True, parser_class=Parser)
    p = benches.add_parser("pie", help="PIE-Bench (Ju et al., 2023): every photo inverted and edited by each "
                           "method under the benchmark's P2P protocol, scored as its authors score")
    p.add_argument("--data", type=Path, required=True, help="the PIE-Bench folder: mapping_file.json and "
                   "annotation_images/ (from the benchmark's authors)")
    add_model_args(p)
    p.add_argument("--out", type=Path, required=True, help="its folder: results*.jsonl, table.md, sheet.png, "
                   "cells/ (made if missing; a rerun resumes)")
    p.add_argument("--methods", type=names(PIE_METHODS), default=list(PIE_METHODS), metavar="M,M",
                   help=f"inversions, comma-separated (default {','.join(PIE_METHODS)})")
    p.add_argument("--types", type=numbers(0, 9), metavar="T,T", help="editing types 0-9, comma-separated "
                   "(default all)")
    p.add_argument("--limit", type=at_least(1), metavar="N", help="the first N photos of each type (default all)")
    p.add_argument("--shard", metavar="K/N", help="run cell i only if i %% N == K (default: RANK/WORLD_SIZE or "
                   "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT from the environment, else all)")
    p.add_argument("--base", nargs="+", action="extend", default=[], metavar="FIELD=VALUE",
                   help="change a field of the protocol's records, e.g. steps=10 (the table is then not "
                   "PIE-Bench's)")
    p.add_argument("--report", action="store_true", help="only rebuild table.md and sheet.png from the results")
    p.add_argument("--clip", type=Path, default=Path("weights/openai--clip-vit-large-patch14"), help="CLIP "
                   "ViT-L/14 for the CLIP similarities (default weights/openai--clip-vit-large-patch14; skipped "
                   "if absent)")
    p.add_argument("--dino", type=Path, default=Path("weights/facebook--dino-vitb8"), help="DINO ViT-B/8 for the "
                   "structure distance (default weights/facebook--dino-vitb8; skipped if absent)")
    p.add_argument("--lpips", type=Path, default=Path("weights/lpips-squeeze.safetensors"), help="LPIPS "
                   "(SqueezeNet) weights, made by scripts/convert_lpips.py (default "
                   "weights/lpips-squeeze.safetensors; skipped if absent)")

    p = commands.add_parser("sites", help="list every attention layer: call order, name, place, map size")
    p.add_argument("--weights", type=path, required=True, help="SD v1 or 2.x checkpoint (only its headers are read)")
    add_prediction_arg(p)
    p.add_argument("--height", type=at_least(8), default=512, help="image height (default: the model's native "
                   "size)")
    p.add_argument("--width", type=at_least(8), default=512, help="image width (default: the model's native size)")

    p = commands.add_parser("download", help="fetch a diffusers-layout SD repository, or one transformers "
                            "model for the metrics (safetensors only)")
    p.add_argument("--repo", default=DEFAULT_REPO, help=f"repository id (default {DEFAULT_REPO})")
    p.add_argument("--dir", type=Path, default=Path("weights"), help="where to put it (default weights/)")
    p.add_argument("--fp16", action="store_true", help="take the fp16 weight files where the repository has them")
    p.add_argument("--revision", help="branch, tag or commit")
    return root


def parse(argv=None) -> argparse.Namespace:
    """The flags, with the WORD=VALUE lists turned into dicts (errors exit 2 in one line)."""
    p = parser()
    args = p.parse_args(argv)
    if args.command == "edit":
        try:
            args.reweight = pairs(args.reweight, "--reweight", finite)
            args.word_steps = pairs(args.word_steps, "--word-steps", window)
        except argparse.ArgumentTypeError as e:
            p.exit(2, f"p2p edit: error: {e} (see --help)\n")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    name = f"p2p {argv[0]}" if argv and not argv[0].startswith("-") else "p2p"   # for a Ctrl-C while parsing
    try:
        try:
            args = parse(argv)
        except SystemExit as e:   # --help, or a usage error already printed in one line
            return e.code or 0
        # torch and the models load here, after parsing, inside the Ctrl-C and error handling.
        # numpy first: torch's C start-up imports it and clears any error that import raises,
        # so a Ctrl-C landing there would be lost (the run would go on to the end).
        import numpy  # noqa: F401
        import torch
        from models import InputError

        from . import commands
        run = {"generate": commands.generate, "edit": commands.edit, "invert": commands.invert,
               "maps": commands.maps, "sites": commands.sites, "sweep": commands.sweep, "bench": commands.bench,
               "download": commands.download}[args.command]
        try:
            run(args)
        except InputError as e:
            print(f"p2p {args.command}: error: {e}", file=sys.stderr)
            return 2
        except torch.OutOfMemoryError:
            print(f"p2p {args.command}: error: out of memory; try --dtype bfloat16 or float16, or a smaller size",
                  file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:   # `p2p sites | head`: the reader has gone, so there is no one to tell
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # nor a flush at exit to fail
        return 0
    return 0
