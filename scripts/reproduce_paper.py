"""Render the paper's examples and every cell of the official notebooks, with an index page.

    python scripts/reproduce_paper.py --weights weights/CompVis--stable-diffusion-v1-4 --out paper/ \
        --photos path/to/prompt-to-prompt/example_images
    python scripts/reproduce_paper.py --tiny --out /tmp/paper     # smoke test on a random tiny model

Two manifests, both lists of entries, each an experiment record (p2p/experiment/record.py) with a name:
- scripts/paper_examples.json: the paper's Stable Diffusion examples with its defaults (DDIM);
- scripts/official_examples.json: each cell of google/prompt-to-prompt's notebooks that renders
  an edit or a map, transcribed (PLMS, the authors' mapper and seed 8888 for the SD notebook;
  DDIM, a real photo and blend start 0.2 for the null-text one).
Each edit entry takes the road of `p2p edit` (p2p/experiment/run.py: prepare, run, write; OUT/NAME.png,
and its token maps OUT/NAME-maps.png); a "maps" entry run.attention_maps (OUT/NAME.png);
"baseline" entries also render the prompts without the edit (run.generation), as the notebook's
run_baseline=True does (OUT/NAME-baseline.png). Sizes an entry leaves out are the model's native ones. OUT/index.html shows every image beside the
`p2p` command that makes it (cli.command_line). Every entry is checked before the model
loads, once. Photo entries need their photo in
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
from models import DTYPES, InputError  # noqa: E402
from models.checkpoint import load as load_architecture  # noqa: E402
from p2p import cli, sampler, viz  # noqa: E402
from p2p.experiment import output, record, run  # noqa: E402

MANIFESTS = {"paper": Path(__file__).with_name("paper_examples.json"),
             "official": Path(__file__).with_name("official_examples.json")}
ABOUT = ("name", "what", "notebook", "cell", "command", "baseline", "differs")   # the rest is a record
MAPS = ("prompt", "res", "seed", "steps", "guidance", "height", "width", "sampler")   # a maps entry's keys
SAMPLING = ("seed", "steps", "guidance", "height", "width", "sampler")
TINY = {"steps": 5, "height": 128, "width": 128}


def load(name: str) -> dict:
    return json.loads(MANIFESTS[name].read_text())


def record_of(entry: dict, photos: Path | None, where: str) -> record.Experiment:
    """The experiment record of an edit entry (its photo looked up in `photos`)."""
    fields = {k: v for k, v in entry.items() if k not in ABOUT}
    if "image" in fields:
        fields["image"] = str((photos or Path(".")) / fields["image"])
    return record.from_json(fields, where)


def sampling(values: dict, model) -> dict:
    """The sampling fields of an entry or a record's JSON: those given, else the record's defaults and
    the model's native size."""
    given = {k: values[k] for k in SAMPLING if values.get(k) is not None}
    size = run.defaults(model, given.get("height"), given.get("width"))
    return {**{k: record.FIELDS[k].default for k in SAMPLING}, **given, "height": size["height"],
            "width": size["width"]}


def flags(values: dict) -> list[str]:
    return [a for k, v in values.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def plan(entry: dict, where: str, out: Path, photos: Path | None, shown_model: list[str], weights: Path,
         model) -> list[tuple]:
    """[(image file, what to run, the command that makes it)] for one entry, checked against the
    model's architecture: "maps" -> ("maps", kwargs), an edit -> ("edit", run.Plan), its baseline
    -> ("generate", kwargs)."""
    name = entry["name"]
    if entry.get("command") == "maps":
        unknown = [k for k in entry if k not in ABOUT + MAPS]
        if unknown:
            raise InputError(f"{where}: unknown field {unknown[0]!r} for a maps entry")
        values = sampling(record.check_values({k: entry[k] for k in SAMPLING if k in entry}, where), model)
        res = entry.get("res") or run.defaults(model, values["height"], values["width"])["blend_res"]
        kwargs = {"prompt": entry["prompt"], "res": res, **values}
        shown = ["maps", *shown_model, "--prompt", entry["prompt"], *flags({k: kwargs[k] for k in kwargs if k != "prompt"})]
        return [(f"{name}.png", "maps", kwargs, shown + ["--out", str(out / f"{name}.png")])]
    outputs = run.Outputs(image=out / f"{name}.png", maps=out / f"{name}-maps.png")
    edit = run.prepare(record_of(entry, photos, where), weights, outputs, model=model, cache_dir=out)
    r = edit.record
    runs = [(f"{name}.png", "edit", edit, ["edit", *shown_model, *cli.command_line(r), "--out", str(outputs.image),
                                           "--maps-out", str(outputs.maps)])]
    if entry.get("baseline"):   # the notebook's run_baseline=True: the same prompts and noise, no edit
        values = sampling(r.to_json(), model)
        shown = ["generate", *shown_model, *[a for p in r.prompts for a in ("--prompt", p)], *flags(values)]
        runs.insert(0, (f"{name}-baseline.png", "generate", {"prompts": r.prompts, **values},
                        shown + ["--out", str(out / f"{name}-baseline.png")]))
    return runs


def render(sd, kind: str, what, image: str, out: Path):
    """Make one image of the plan: the library's own functions, never a command line."""
    if kind == "maps":
        kwargs = dict(what)
        prompt, res = kwargs.pop("prompt"), kwargs.pop("res")
        grid = run.attention_maps(sd, prompt, res, (0, sampler.calls(kwargs["sampler"], kwargs["steps"])), **kwargs)
        output.save_image(out / image, grid, {"prompt": prompt, "res": str(res), **run.about(sd, "p2p maps")})
    elif kind == "generate":
        kwargs = dict(what)
        prompts = kwargs.pop("prompts")
        _, images = run.generation(sd, prompts, **kwargs)
        output.save_image(out / image, viz.labelled_row(images, prompts),
                          {"prompts": json.dumps(prompts, ensure_ascii=False), **run.about(sd, "p2p generate")})
    else:
        run.write(run.run(sd, what), what.outputs)


def section(title: str, about: str, entries: list[dict], runs: dict[str, list], skipped: dict[str, str]) -> str:
    rows = [f"<h2>{html.escape(title)}</h2>\n<p>{html.escape(about)}</p>"]
    for e in entries:
        where = f" ({e['notebook']}, cell {e['cell']})" if "notebook" in e else ""
        rows.append(f"<h3>{html.escape(e['name'])}{html.escape(where)}: {html.escape(e['what'])}</h3>")
        if e["name"] in skipped:
            rows.append(f"<p><em>skipped: {html.escape(skipped[e['name']])}</em></p>")
            continue
        for image, kind, _, shown in runs[e["name"]]:
            rows.append(f"<p><img src='{html.escape(image)}' style='max-width:100%'></p>\n"
                        f"<pre>{html.escape('p2p ' + shlex.join(shown))}</pre>")
            if kind == "edit":
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
    ap.add_argument("--dtype", choices=DTYPES, default="float32")
    args = ap.parse_args(argv)
    manifests = {m: load(m) for m in args.manifest or MANIFESTS}
    chosen = {m: [(i, e) for i, e in enumerate(d["examples"]) if not args.only or e["name"] in args.only]
              for m, d in manifests.items()}
    if not any(chosen.values()):
        print(f"reproduce_paper: error: no entry named {', '.join(args.only)}", file=sys.stderr)
        return 2
    model = [*(["--device", args.device] if args.device else []), "--dtype", args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights
        if args.tiny:
            import make_tiny  # scripts/make_tiny.py
            make_tiny.main([tmp])
            weights = Path(tmp) / "tiny.safetensors"
            chosen = {m: [(i, {**e, **TINY}) for i, e in es] for m, es in chosen.items()}
        if weights is None:
            print("reproduce_paper: error: give --weights (or --tiny for a smoke test)", file=sys.stderr)
            return 2
        model = ["--weights", str(weights), *model]
        args.out.mkdir(parents=True, exist_ok=True)
        runs, skipped = {}, {}
        try:   # every entry checked against the model's architecture before the model loads
            architecture = load_architecture(weights, "meta")
            for m, es in chosen.items():
                for i, e in es:
                    if "image" in e and not (args.photos and (args.photos / e["image"]).is_file()):
                        skipped[e["name"]] = f"needs the photo {e['image']} in --photos (from " \
                                             "google/prompt-to-prompt's example_images/)"
                    else:
                        runs[e["name"]] = plan(e, f"{MANIFESTS[m].name}[{i}] ({e['name']})", args.out, args.photos,
                                               model, weights, architecture)
            sd = run.load(weights, args.device, args.dtype) if runs else None
            for name, entry_runs in runs.items():
                for image, kind, what, _ in entry_runs:
                    print(f"== {name}: {image}", file=sys.stderr)
                    render(sd, kind, what, image, args.out)
        except InputError as e:
            print(f"reproduce_paper: error: {e}", file=sys.stderr)
            return 2
    page = "\n".join(section(f"{m}: {MANIFESTS[m].name}", manifests[m]["about"], [e for _, e in es], runs, skipped)
                     for m, es in chosen.items() if es)
    (args.out / "index.html").write_text("<!doctype html><meta charset='utf-8'><title>Prompt-to-Prompt: the paper "
                                         "and the official notebooks</title>\n<h1>Prompt-to-Prompt: the paper and "
                                         "the official notebooks</h1>\n" + page + "\n")
    print(f"wrote {args.out / 'index.html'}" + (f" ({len(skipped)} skipped)" if skipped else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
