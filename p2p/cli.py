"""The `p2p` command: generate, edit, invert, maps, sites, sweep, bench, download.

This file parses and checks the flags; p2p/commands.py does the work. It imports only the
standard library, so `--help` and usage errors are instant and Ctrl-C while torch loads is
one line. Bad input is one line on stderr and exit status 2.
"""
import argparse
import dataclasses
import os
import signal
import sys
import threading
from pathlib import Path

from models import BABY, DTYPES, PREDICTIONS

from .experiment import record

DEFAULT_REPO = "CompVis/stable-diffusion-v1-4"       # the checkpoint of the paper's SD figures


class Once(argparse.Action):
    """Store a flag's value, refusing the flag a second time (argparse would keep the last)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(self, "given", False):   # (a parser, and so its actions, is made anew for each parse)
            parser.error(f"{option_string} given twice")
        self.given = True
        setattr(namespace, self.dest, values)


class Parser(argparse.ArgumentParser):
    def error(self, message):   # argparse would print the whole usage; one line is enough
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def add_argument(self, *names, **kwargs):
        if "action" not in kwargs and names[0].startswith("--"):
            kwargs["action"] = Once
        return super().add_argument(*names, **kwargs)


# ---- values of flags that are no record field: each refuses what it cannot take, in one line

def path(text: str) -> Path:
    """A file or folder flag: "" is refused (Path("") would quietly be the working directory)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path")
    return Path(text)


def at_least(low: int):
    def check(text: str) -> int:
        try:
            return record.integer(text, low)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
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


def window_text(value) -> str:
    return f"{value[0]}:{value[1]}" if isinstance(value, tuple) else str(value)


def command_line(r: record.Experiment) -> list[str]:
    """The `p2p edit` flags that give this record (defaults left out), for showing how a result
    was made; parsing them gives the record back."""
    defaults, out = record.Experiment(r.source, r.targets, r.mode), []
    for name in record.FIELDS:
        value = getattr(r, name)
        if name in record.REQUIRED or value != getattr(defaults, name) and value is not None:
            flag = record.name(name, None)
            if name == "targets":
                out += [a for t in value for a in (flag, t)]
            elif name in ("word_steps", "reweight"):
                out += [flag, *(f"{w}={window_text(v)}" for w, v in value.items())]
            elif name in ("blend", "blend_subtract"):
                out += [flag, *(",".join(words) for words in value)]
            elif name == "offsets":
                out += [flag, ",".join(map(str, value))]
            elif name.endswith("_sites"):
                out += [flag, ",".join(record.site_text(p, s) for p, s in value)]
            else:
                out += [flag, window_text(value) if name.endswith("_steps") else str(value)]
    return out


def add_fields(p: argparse.ArgumentParser, fields):
    """Flags for record fields, made from the record (p2p/experiment/record.py): its help and
    default; the value stays as given (None when not given), for the record to check."""
    for name in fields:
        f = record.FIELDS[name]
        meta, default = f.metadata, f.default
        shown = window_text(default) if not isinstance(default, tuple) else ",".join(map(str, default))
        help = meta["help"] + (f" (default {shown})" if default not in (None, (), dataclasses.MISSING) else "")
        kwargs = {"dest": name, "help": help, "metavar": meta.get("metavar")}
        if meta.get("repeat"):
            kwargs["action"] = "append"
        elif meta.get("many"):
            kwargs |= {"nargs": "+", "action": "extend"}
        p.add_argument(record.name(name, None), **kwargs)


# ---- the parser ------------------------------------------------------------------------

def add_model_args(p: argparse.ArgumentParser):
    p.add_argument("--weights", type=path, help="SD v1 or 2.x checkpoint: a .safetensors file (LDM layout) or a "
                   "diffusers-layout folder (get one with `p2p download`); default: the baby model of "
                   "weights/baby/ (scripts/train_baby.py), 64 px, coloured shapes only")
    p.add_argument("--device", choices=["cpu", "cuda", "mps"], help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and activations (default "
                   "float32; on a CPU, bfloat16 is the fast half precision, float16 is very slow)")
    add_prediction_arg(p)


def add_prediction_arg(p: argparse.ArgumentParser):
    p.add_argument("--prediction", choices=PREDICTIONS, help="what the UNet predicts (default: a diffusers "
                   "folder's scheduler config, else epsilon); an SD 2.x single file cannot say: v_prediction for "
                   "SD 2.0 / 2.1 at 768 px, epsilon for the -base models at 512 px")


SAMPLING = ("seed", "steps", "sampler", "guidance", "height", "width")
INVERSION = ("method", "inner_steps", "offsets")


def parser() -> argparse.ArgumentParser:
    root = Parser(prog="p2p", description="Prompt-to-Prompt image editing on Stable Diffusion v1 and 2.x.")
    commands = root.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = commands.add_parser("generate", help="text to image, one shared noise for all prompts")
    add_model_args(p)
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    p.add_argument("--negative", default="", help='unconditional prompt of guidance (default "")')
    add_fields(p, SAMPLING)
    p.add_argument("--out", type=path, required=True, help="image (.png with the settings as metadata, "
                   ".jpg, .webp): the images side by side, labelled")
    p.add_argument("--latents-out", type=path, help="safetensors: final latents [n_prompts, 4, H/8, W/8]")

    p = commands.add_parser("edit", help="Prompt-to-Prompt: edit a source prompt's image into target prompts")
    add_model_args(p)
    p.add_argument("--recipe", type=path, help="re-run an earlier result exactly: its image or latents file "
                   "(or a JSON experiment record); the edit's flags given with it change single fields")
    add_fields(p, [f for f in record.FIELDS if f not in ("image", "inversion", *INVERSION)])
    p.add_argument("--out", type=path, required=True, help="image (.png, .jpg, .webp): source and targets "
                   "side by side, labelled")
    p.add_argument("--latents-out", type=path, help="safetensors: final latents [1 + n_targets, 4, H/8, W/8]")
    p.add_argument("--maps-out", type=path, help="image: per-token cross-attention maps of every prompt")
    p.add_argument("--maps-res", type=at_least(1), help="resolution of the maps --maps-out draws (default 16; "
                   "the short side / 32 for a model native to another size)")
    add_fields(p, ("image", "inversion", *INVERSION))

    p = commands.add_parser("invert", help="invert a photo for editing: x_T and per-step null embeddings")
    add_model_args(p)
    p.add_argument("--image", type=path, required=True, help="the photo: any image Pillow reads")
    p.add_argument("--prompt", required=True, help="a caption of the photo; edit it later with --source PROMPT")
    add_fields(p, (*INVERSION, "steps", "guidance"))
    p.add_argument("--size", type=at_least(8), help="model image size: the photo is "
                   "centre-cropped to a square and resized to it (default: the model's native size, 512, or 768 for SD 2 at "
                   "768 px)")
    p.add_argument("--out", type=path, required=True, help="safetensors: x_T, z0, null_embeddings or "
                   "trajectory, settings")

    p = commands.add_parser("maps", help="per-token cross-attention maps over the generated image")
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the prompt whose image and token maps are drawn")
    p.add_argument("--res", type=at_least(1), help="resolution of the maps averaged (default 16; "
                   "the short side / 32 for a model native to another size)")
    p.add_argument("--steps-range", default="", metavar="A:B", help="average over steps A..B-1 (UNet calls "
                   "under plms; default all)")
    p.add_argument("--sites", default="", metavar="ITEMS", help="average only these layers at --res, "
                   "PLACE:SIDE items as edit's --cross-sites (default: the down and up blocks)")
    add_fields(p, SAMPLING)
    p.add_argument("--out", type=path, required=True, help="image: the image, then one map per token")
    p.add_argument("--components", type=at_least(0), default=0, metavar="N",
                   help="also draw the top N principal components of self-attention at --res")

    p = commands.add_parser("sweep", help="a grid of edits from a JSON spec: results, tables, contact sheets")
    p.add_argument("spec", type=Path, help="the sweep spec: base record, cases, axes (see the README's Ablations)")
    p.add_argument("--weights", type=Path, help="SD v1 or 2.x checkpoint (default: the baby model; not read with "
                   "--report)")
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
    p.add_argument("--methods", type=names(record.METHODS), metavar="M,M", help="inversions, comma-separated "
                   "(default all: ddim, null-text, negative-prompt, direct)")
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
    p.add_argument("--weights", type=path, help="SD v1 or 2.x checkpoint (only its headers are read; default: "
                   "the baby model)")
    add_prediction_arg(p)
    add_fields(p, ("height", "width"))

    p = commands.add_parser("download", help="fetch a diffusers-layout SD repository, or one transformers "
                            "model for the metrics (safetensors only)")
    p.add_argument("--repo", default=DEFAULT_REPO, help=f"repository id (default {DEFAULT_REPO})")
    p.add_argument("--dir", type=Path, default=Path("weights"), help="where to put it (default weights/)")
    p.add_argument("--fp16", action="store_true", help="take the fp16 weight files where the repository has them")
    p.add_argument("--revision", help="branch, tag or commit")
    return root


def parse(argv=None) -> argparse.Namespace:
    """The flags (errors exit 2 in one line)."""
    return parser().parse_args(argv)


def imports(interrupted: list):
    """torch, the models and the commands, loaded after parsing. A C extension's import can lose a
    Ctrl-C (torch's start-up clears the error of the numpy import it makes) or turn it into an
    ImportError (numpy's, when it lands in numpy's own); `interrupted` says one came all the same."""
    try:
        import numpy  # noqa: F401
        import torch  # noqa: F401

        from . import commands
    except ImportError:
        if interrupted:
            raise KeyboardInterrupt from None
        raise
    if interrupted:
        raise KeyboardInterrupt
    return commands


def baby() -> Path:
    """The default model, said once on stderr: p2p runs on a fresh clone with no download."""
    from models import InputError
    if not (BABY / "unet").is_dir():
        raise InputError(f"no --weights given, and no baby model at {BABY}: give --weights, or train the baby "
                         "with `python scripts/train_baby.py --out weights/baby`")
    print(f"using the baby model {BABY.relative_to(BABY.parents[2])} (64 px, shapes only); --weights for Stable "
          "Diffusion", file=sys.stderr)
    return BABY


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    name = f"p2p {argv[0]}" if argv and not argv[0].startswith("-") else "p2p"   # for a Ctrl-C while parsing
    interrupted = []

    def on_interrupt(signum, frame):   # Python's own handler, noting that it ran
        interrupted.append(signum)
        raise KeyboardInterrupt

    # (only in the main thread, and not where SIGINT is ignored or another handler is set)
    ours = signal.getsignal(signal.SIGINT) is signal.default_int_handler and \
        threading.current_thread() is threading.main_thread()
    if ours:
        signal.signal(signal.SIGINT, on_interrupt)
    try:
        try:
            args = parse(argv)
        except SystemExit as e:   # --help, or a usage error already printed in one line
            return e.code or 0
        commands = imports(interrupted)
        import torch
        from models import InputError
        run = {"generate": commands.generate, "edit": commands.edit, "invert": commands.invert,
               "maps": commands.maps, "sites": commands.sites, "sweep": commands.sweep, "bench": commands.bench,
               "download": commands.download}[args.command]
        try:
            if getattr(args, "weights", BABY) is None and not getattr(args, "report", False):
                args.weights = baby()
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
    finally:
        if ours:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    return 0
