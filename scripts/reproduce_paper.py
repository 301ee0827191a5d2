"""Render the paper's examples and every cell of the official notebooks, with an index page.

    python scripts/reproduce_paper.py --weights weights/CompVis--stable-diffusion-v1-4 --out paper/ \
        --photos path/to/prompt-to-prompt/example_images
    python scripts/reproduce_paper.py --tiny --out /tmp/paper     # smoke test on a random tiny model

Two manifests, both lists of entries whose keys are `p2p` flags:
- scripts/paper_examples.json: the paper's Stable Diffusion examples with its defaults (DDIM);
- scripts/official_examples.json: each cell of google/prompt-to-prompt's notebooks that renders
  an edit or a map, transcribed (PLMS, the authors' mapper and seed 8888 for the SD notebook;
  DDIM, a real photo and blend start 0.2 for the null-text one).
Each entry is one `p2p edit` (OUT/NAME.png, and its token maps OUT/NAME-maps.png) or `p2p maps`
(OUT/NAME.png); "baseline" entries also render the prompts without the edit, as the notebook's
run_baseline=True does (OUT/NAME-baseline.png). OUT/index.html shows every image beside the
exact command that made it. The model is loaded once. Photo entries need their photo in
--photos (the null-text notebook's gnochi_mirror.jpeg is in google/prompt-to-prompt's
example_images/); without it they are listed as skipped.
"""
import argparse
import html
import json
import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
from models import InputError  # noqa: E402
from p2p import cli, commands  # noqa: E402

MANIFESTS = {"paper": Path(__file__).with_name("paper_examples.json"),
             "official": Path(__file__).with_name("official_examples.json")}
ABOUT = ("name", "what", "notebook", "cell", "command", "baseline", "differs", "image", "source", "targets", "prompt")
MANY = ("word_steps", "reweight", "blend", "blend_subtract")       # flags that take several values
SAMPLING = ("seed", "steps", "guidance", "height", "width", "sampler")
TINY = {"steps": 5, "height": 128, "width": 128}


def load(name: str) -> dict:
    return json.loads(MANIFESTS[name].read_text())


def flags(entry: dict, keys) -> list[str]:
    out = []
    for key in keys:
        if key in entry and key not in ABOUT:
            value = entry[key]
            out += [f"--{key.replace('_', '-')}", *(map(str, value) if key in MANY else [str(value)])]
    return out


def commands_of(entry: dict, weights: Path, out: Path, photos: Path | None, extra: list[str]) -> dict[str, list[str]]:
    """{image file: its `p2p` command line} for one manifest entry."""
    name, model = entry["name"], ["--weights", str(weights), *extra]
    if entry.get("command") == "maps":
        return {f"{name}.png": ["maps", *model, "--prompt", entry["prompt"], *flags(entry, entry),
                                "--out", str(out / f"{name}.png")]}
    prompts = [entry["source"], *entry["targets"]]
    photo = ["--image", str((photos or Path(".")) / entry["image"])] if "image" in entry else []
    edit = ["edit", *model, *photo, "--source", entry["source"], *[a for t in entry["targets"] for a in ("--target", t)],
            *flags(entry, entry), "--out", str(out / f"{name}.png"), "--maps-out", str(out / f"{name}-maps.png")]
    runs = {f"{name}.png": edit}
    if entry.get("baseline"):   # the notebook's run_baseline=True: the same prompts and noise, no edit
        runs = {f"{name}-baseline.png": ["generate", *model, *[a for p in prompts for a in ("--prompt", p)],
                                         *flags(entry, SAMPLING), "--out", str(out / f"{name}-baseline.png")],
                **runs}
    return runs


def section(title: str, about: str, entries: list[dict], runs: dict[str, dict], skipped: dict[str, str]) -> str:
    rows = [f"<h2>{html.escape(title)}</h2>\n<p>{html.escape(about)}</p>"]
    for e in entries:
        where = f" ({e['notebook']}, cell {e['cell']})" if "notebook" in e else ""
        rows.append(f"<h3>{html.escape(e['name'])}{html.escape(where)}: {html.escape(e['what'])}</h3>")
        if e["name"] in skipped:
            rows.append(f"<p><em>skipped: {html.escape(skipped[e['name']])}</em></p>")
            continue
        for image, argv in runs[e["name"]].items():
            rows.append(f"<p><img src='{html.escape(image)}' style='max-width:100%'></p>\n"
                        f"<pre>{html.escape('p2p ' + shlex.join(argv))}</pre>")
            if argv[0] == "edit":
                rows.append(f"<p><img src='{html.escape(image[:-4])}-maps.png' style='max-width:100%'></p>")
        if "differs" in e:
            rows.append(f"<p><strong>Differs from the notebook:</strong> {html.escape(e['differs'])}</p>")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, help="SD v1 checkpoint (file or diffusers folder); the notebooks ran "
                    "CompVis/stable-diffusion-v1-4")
    ap.add_argument("--tiny", action="store_true", help="smoke test: a random tiny model, 5 steps, 128x128")
    ap.add_argument("--out", type=Path, required=True, help="folder for the images and index.html")
    ap.add_argument("--manifest", choices=list(MANIFESTS), action="append", help="render only this manifest "
                    "(repeatable; default both)")
    ap.add_argument("--only", action="append", help="render only the entry of this name (repeatable)")
    ap.add_argument("--photos", type=Path, help="folder with the photos of the photo entries")
    ap.add_argument("--device", choices=["cpu", "cuda", "mps"])
    ap.add_argument("--dtype", choices=cli.DTYPES, default="float32")
    args = ap.parse_args(argv)
    manifests = {m: load(m) for m in args.manifest or MANIFESTS}
    chosen = {m: [e for e in d["examples"] if not args.only or e["name"] in args.only] for m, d in manifests.items()}
    if not any(chosen.values()):
        print(f"reproduce_paper: error: no entry named {', '.join(args.only)}", file=sys.stderr)
        return 2
    extra = [*(["--device", args.device] if args.device else []), "--dtype", args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights
        if args.tiny:
            import make_tiny  # scripts/make_tiny.py
            make_tiny.main([tmp])
            weights = Path(tmp) / "tiny.safetensors"
            chosen = {m: [{**e, **TINY} for e in es] for m, es in chosen.items()}
        if weights is None:
            print("reproduce_paper: error: give --weights (or --tiny for a smoke test)", file=sys.stderr)
            return 2
        args.out.mkdir(parents=True, exist_ok=True)
        runs, skipped = {}, {}
        for e in (e for es in chosen.values() for e in es):
            if "image" in e and not (args.photos and (args.photos / e["image"]).is_file()):
                skipped[e["name"]] = f"needs the photo {e['image']} in --photos (from google/prompt-to-prompt's " \
                                     "example_images/)"
            else:
                runs[e["name"]] = commands_of(e, weights, args.out, args.photos, extra)
        try:
            parsed = {name: {image: cli.parse(a) for image, a in r.items()} for name, r in runs.items()}
            sd = None
            for name, r in parsed.items():
                for image, a in r.items():
                    sd = sd or commands.load_model(a)
                    print(f"== {name}: {image}", file=sys.stderr)
                    {"edit": commands.edit, "maps": commands.maps, "generate": commands.generate}[a.command](a, sd)
        except InputError as e:
            print(f"reproduce_paper: error: {e}", file=sys.stderr)
            return 2
    page = "\n".join(section(f"{m}: {MANIFESTS[m].name}", manifests[m]["about"], es, runs, skipped)
                     for m, es in chosen.items() if es)
    (args.out / "index.html").write_text("<!doctype html><meta charset='utf-8'><title>Prompt-to-Prompt: the paper "
                                         "and the official notebooks</title>\n<h1>Prompt-to-Prompt: the paper and "
                                         "the official notebooks</h1>\n" + page + "\n")
    print(f"wrote {args.out / 'index.html'}" + (f" ({len(skipped)} skipped)" if skipped else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
