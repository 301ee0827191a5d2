"""The `p2p` command: generate, download. Bad input is one line on stderr and exit status 2."""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

from models import InputError
from models.text import check_prompts, load_tokenizer

from . import output, sampler

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
    from models.checkpoint import load   # imported here so `p2p --help` stays fast
    if args.weights is None:
        raise InputError("no --weights given: pass a .safetensors file or a diffusers folder, "
                         f"or fetch the paper's model with `p2p download` (into weights/)")
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
