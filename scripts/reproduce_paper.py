"""Render the paper's Stable Diffusion examples (scripts/paper_examples.json) and an index page.

    python scripts/reproduce_paper.py --weights weights/CompVis--stable-diffusion-v1-4 --out paper/
    python scripts/reproduce_paper.py --tiny --out /tmp/paper     # smoke test on a random tiny model

Each example is one `p2p edit` run with the settings of the manifest (the paper's defaults:
50 DDIM steps, guidance 7.5, 512x512, seed 0 unless an entry says otherwise), written as
OUT/NAME.png (source and targets side by side, labelled) and OUT/NAME-maps.png (per-token
cross-attention maps), with OUT/index.html listing every example and its settings. The
model is loaded once. `--only NAME` renders a single example.
"""
import argparse
import html
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
from models import InputError  # noqa: E402
from p2p import cli, commands  # noqa: E402

MANIFEST = Path(__file__).with_name("paper_examples.json")


def edit_argv(example: dict, weights: Path, out: Path, overrides: list[str]) -> list[str]:
    """The `p2p edit` command line of one manifest entry."""
    argv = ["edit", "--weights", str(weights), "--source", example["source"], "--mode", example["mode"]]
    for target in example["targets"]:
        argv += ["--target", target]
    for key in ("cross_steps", "self_steps", "seed", "steps", "guidance"):
        if key in example:
            argv += [f"--{key.replace('_', '-')}", str(example[key])]
    for key in ("word_steps", "reweight", "blend"):
        if key in example:
            argv += [f"--{key.replace('_', '-')}", *example[key]]
    return argv + overrides + ["--out", str(out / f"{example['name']}.png"),
                               "--maps-out", str(out / f"{example['name']}-maps.png")]


def index_page(examples: list[dict], argvs: list[list[str]]) -> str:
    rows = []
    for ex, argv in zip(examples, argvs):
        command = html.escape("p2p " + " ".join(a if " " not in a else f'"{a}"' for a in argv))
        rows.append(f"<h2>{html.escape(ex['name'])}: {html.escape(ex['what'])}</h2>\n"
                    f"<p><img src='{ex['name']}.png'></p>\n<p><img src='{ex['name']}-maps.png' width=100%></p>\n"
                    f"<pre>{command}</pre>")
    return ("<!doctype html><meta charset='utf-8'><title>Prompt-to-Prompt: paper examples</title>\n"
            "<h1>Prompt-to-Prompt: the paper's Stable Diffusion examples</h1>\n" + "\n".join(rows) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, help="SD v1 checkpoint (file or diffusers folder)")
    ap.add_argument("--tiny", action="store_true", help="smoke test: a random tiny model, 5 steps, 128x128")
    ap.add_argument("--out", type=Path, required=True, help="folder for the images and index.html")
    ap.add_argument("--only", help="render only the example of this name")
    ap.add_argument("--device", choices=["cpu", "cuda", "mps"])
    ap.add_argument("--dtype", choices=cli.DTYPES, default="float32")
    args = ap.parse_args(argv)
    examples = [e for e in json.loads(MANIFEST.read_text()) if args.only in (None, e["name"])]
    if not examples:
        print(f"reproduce_paper: error: no example named {args.only!r}", file=sys.stderr)
        return 2
    overrides = [*(["--device", args.device] if args.device else []), "--dtype", args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights
        if args.tiny:
            import make_tiny  # scripts/make_tiny.py
            make_tiny.main([tmp])
            weights, overrides = Path(tmp) / "tiny.safetensors", overrides + [
                "--steps", "5", "--height", "128", "--width", "128"]
        if weights is None:
            print("reproduce_paper: error: give --weights (or --tiny for a smoke test)", file=sys.stderr)
            return 2
        args.out.mkdir(parents=True, exist_ok=True)
        argvs = [edit_argv(e, weights, args.out, overrides) for e in examples]
        try:
            sd = commands.load_model(cli.parse(argvs[0]))
            for ex, a in zip(examples, argvs):
                print(f"== {ex['name']}: {ex['what']}", file=sys.stderr)
                commands.edit(cli.parse(a), sd)
        except InputError as e:
            print(f"reproduce_paper: error: {e}", file=sys.stderr)
            return 2
    (args.out / "index.html").write_text(index_page(examples, argvs))
    print(f"wrote {args.out / 'index.html'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
