"""`p2p sweep`: cells, shards, resuming after an interruption, the tables and sheets, bad specs."""
import json
import re

import pytest
from PIL import Image

from models import InputError
from models.checkpoint import load
from p2p import viz
from p2p.eval import metrics
from p2p.eval import sweep
from p2p.experiment import grid
from p2p.cli import main

from conftest import ROOT

CAT, DOG = "a cat riding a bicycle", "a dog riding a bicycle"
HOUSE = "a photo of a house on a mountain"
SPEC = {"base": {"steps": 2, "height": 128, "width": 128, "blend_threshold": 0.75},
        "cases": [{"name": "cat", "source": CAT, "targets": [DOG], "mode": "replace", "blend": [["cat"], ["dog"]]},
                  {"name": "house", "source": HOUSE, "targets": [HOUSE + " at winter"], "mode": "refine"}],
        "axes": {"cross_sites": ["any@0", "any:any"], "self_max_tokens": [0, 256], "seed": [0, 1]}}


def test_cells_are_every_case_times_the_grid_in_a_fixed_order():
    cells = sweep.cells(SPEC)
    assert len(cells) == 2 * 2 * 2 * 2 and [c.index for c in cells] == list(range(16))
    assert [c.case for c in cells] == ["cat"] * 8 + ["house"] * 8
    assert dict(cells[1].axes) == {"cross_sites": "any@0", "self_max_tokens": 0, "seed": 1}
    assert cells[1].record.seed == 1 and cells[1].record.cross_sites == (("any", "@0"),)
    assert len({c.key for c in cells}) == 16
    zipped = sweep.cells({**SPEC, "axes": {"seed": [0, 1], "guidance": [5, 9]}, "combine": "zip"})
    assert [(c.record.seed, c.record.guidance) for c in zipped[:2]] == [(0, 5.0), (1, 9.0)] and len(zipped) == 4
    assert sweep.cells(SPEC, {"steps": 7})[0].record.steps == 7


def test_shards_split_the_cells_and_come_from_the_flag_or_the_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(name, raising=False)
    assert grid.shard_of(None) == (0, 1) and grid.shard_of("2/3") == (2, 3)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "3")
    assert grid.shard_of(None) == (2, 4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert grid.shard_of(None) == (1, 8)                  # torchrun's variables come first
    for bad in ("3/3", "a/b", "1"):
        with pytest.raises(InputError, match="shard"):
            grid.shard_of(bad)


@pytest.mark.parametrize("change, words", [
    ({"cases": [{"name": "cat", "source": CAT, "targets": [DOG], "mode": "replace", "colour": 1}]},
     "spec.cases[0]: unknown field 'colour'"),
    ({"axes": {"seed": [0, -1]}}, "spec.axes.seed[1]: must lie in 0..2**64-1, got -1"),
    ({"axes": {"cross_steps": [0.5, [0.9, 0.1]]}}, "spec.axes.cross_steps[1]: step window 0.9:0.1 ends before"),
    ({"axes": {"hue": [1]}}, "spec.axes: unknown field 'hue'"),
    ({"base": {"steps": 0}}, "spec.base.steps: must lie in 1..1000, got 0"),
    ({"cases": [{"name": "cat", "source": CAT, "targets": [DOG], "mode": "replace", "blend": [["cow"], ["dog"]]}]},
     "spec.cases[0] (cat, cell 0): word 'cow' is not in the prompt"),
    ({"axes": {"seed": [0, 1], "guidance": [5]}, "combine": "zip"}, "zipped axes need as many values each"),
    ({"axes": {"cross_sites": ["up:64"]}}, "spec.cases[0] (cat, cell 0): cross_sites (--cross-sites) up:64: at "
                                           "128x128 this model has no cross-attention layer there"),
])
def test_bad_specs_are_refused_before_the_model_loads(change, words, tiny_file, tmp_path, capsys):
    (tmp_path / "spec.json").write_text(json.dumps({**SPEC, **change}))
    code = main(["sweep", str(tmp_path / "spec.json"), "--weights", str(tiny_file), "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and words in err and "loaded" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s").exists()                       # nothing made before every cell is checked


def test_a_sweep_resumes_where_it_was_stopped_and_its_summary_is_the_saved_images(tiny_file, tmp_path, monkeypatch):
    out, spec, ran = tmp_path / "sweep", dict(SPEC), []
    sd = load(tiny_file)
    real = sweep.run_cell

    def stops_after_five(sd, cell, *a):
        if len(ran) == 5:
            raise KeyboardInterrupt
        ran.append(cell.key)
        return real(sd, cell, *a)

    monkeypatch.setattr(sweep, "run_cell", stops_after_five)
    with pytest.raises(KeyboardInterrupt):
        sweep.sweep(spec, grid.Job(tiny_file, out, load_model=lambda: sd))
    assert len((out / "results.jsonl").read_text().splitlines()) == 5
    with open(out / "results.jsonl", "a") as f:
        f.write('{"key": "torn')                                   # a line cut off by a kill
    monkeypatch.setattr(sweep, "run_cell", lambda sd, cell, *a: ran.append(cell.key) or real(sd, cell, *a))
    every = sweep.sweep(spec, grid.Job(tiny_file, out, load_model=lambda: sd))
    assert len(ran) == 16 and len(set(ran)) == 16              # the first five were not run again
    done = grid.read_results(out)
    assert set(done) == {c.key for c in every}
    nothing = grid.Job(tiny_file, out, load_model=lambda: pytest.fail("nothing is left to run"))
    assert sweep.sweep(spec, nothing) == every

    # every metric is what the saved images give, and summary.md is their mean per axis value
    for row in done.values():
        images = row["images"]
        source = viz.as_tensor(Image.open(out / images["source"]))
        for target, region, m in zip(images["targets"], images["regions"], row["metrics"]):
            mask = viz.as_tensor(Image.open(out / region))[0] > 0.5 if region else None
            assert m == metrics.pixel_metrics(source, viz.as_tensor(Image.open(out / target)), mask)
            assert (region is not None) == (row["case"] == "cat")
    summary = (out / "summary.md").read_text()
    for axis, values in spec["axes"].items():
        for value in values:
            rows = [r for r in done.values() if r["axes"][axis] == value]
            line = next(line for line in summary.splitlines() if line.startswith(f"| {sweep.value_text(value)} |")
                        and summary.index(line) > summary.index(f"## {axis}"))
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert cells[1] == str(len(rows))
            assert cells[4] == grid.figure([m["ssim"] for r in rows for m in r["metrics"]])
    assert "16 of 16 cells done" in summary
    csv_rows = (out / "results.csv").read_text().splitlines()
    assert csv_rows[0] == "key,case,cross_sites,self_max_tokens,seed,target,mse,psnr,ssim,locality"
    assert len(csv_rows) == 1 + 16
    for axis in spec["axes"]:
        sheet = Image.open(out / f"sheet-{axis}.png")
        assert sheet.width > 3 * 128 and sheet.height > (1 + len(spec["axes"][axis])) * 128


def test_shards_write_their_own_files_and_the_report_reads_them_all(tiny_file, tmp_path, capsys):
    (tmp_path / "spec.json").write_text(json.dumps({**SPEC, "axes": {"seed": [0, 1, 2]}}))
    base = ["sweep", str(tmp_path / "spec.json"), "--weights", str(tiny_file), "--out", str(tmp_path / "s"),
            "--base", "steps=1"]
    for k in range(2):
        assert main([*base, "--shard", f"{k}/2"]) == 0, capsys.readouterr().err
    files = sorted(p.name for p in (tmp_path / "s").glob("results*.jsonl"))
    assert files == ["results.0-of-2.jsonl", "results.1-of-2.jsonl"]
    counts = [len((tmp_path / "s" / f).read_text().splitlines()) for f in files]
    assert counts == [3, 3]
    assert "6 of 6 cells done" in (tmp_path / "s" / "summary.md").read_text()
    assert main(["sweep", str(tmp_path / "spec.json"), "--out", str(tmp_path / "s"), "--report",
                 "--base", "steps=1"]) == 0
    assert re.search(r"\| 2 \| 2 \|", (tmp_path / "s" / "summary.md").read_text())


def test_the_readme_sweep_runs_on_the_tiny_model(tiny_file, tmp_path, capsys):
    spec = ROOT / "scripts" / "sweep_cross_layers.json"
    code = main(["sweep", str(spec), "--weights", str(tiny_file), "--out", str(tmp_path / "s"),
                 "--base", "steps=2", "height=128", "width=128"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "s" / "sheet-cross_sites.png").is_file() and (tmp_path / "s" / "summary.md").is_file()


def test_a_process_started_by_torchrun_takes_its_own_gpu(monkeypatch):
    from p2p.experiment import run
    monkeypatch.setattr(run.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(run.torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "6")
    assert run.device_of(None) == "cuda:2"
    monkeypatch.delenv("LOCAL_RANK")
    assert run.device_of(None) == "cuda"


def test_clip_and_dino_metrics_join_when_their_weights_are_there(tiny_file, nets, tmp_path, capsys):
    one = {**SPEC, "cases": SPEC["cases"][:1], "axes": {"seed": [0, 1]}}
    (tmp_path / "spec.json").write_text(json.dumps(one))
    base = ["sweep", str(tmp_path / "spec.json"), "--weights", str(tiny_file), "--base", "steps=1"]
    code = main([*base, "--out", str(tmp_path / "without"), "--clip", str(tmp_path / "none"),
                 "--dino", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert code == 0 and err.count("note: CLIP score skipped") == 1 and "note: structure distance skipped" in err
    assert "clip_score" not in (tmp_path / "without" / "summary.md").read_text()
    code = main([*base, "--out", str(tmp_path / "with"), "--clip", str(nets / metrics.CLIP_FOLDER),
                 "--dino", str(nets / metrics.DINO_FOLDER)])
    assert code == 0, capsys.readouterr().err
    rows = grid.read_results(tmp_path / "with")
    net = metrics.Nets(metrics.Clip.load(nets / metrics.CLIP_FOLDER), metrics.Dino.load(nets / metrics.DINO_FOLDER))
    for row in rows.values():
        record = sweep.record.from_json(row["record"])
        assert row["metrics"] == sweep.cell_metrics(tmp_path / "with", row["images"], record, net)
        assert {"clip_score", "clip_direction", "structure"} <= set(row["metrics"][0])
    assert "| clip_score | clip_direction | structure |" in (tmp_path / "with" / "summary.md").read_text()


def test_edited_words_and_an_attention_region(tiny_file, tmp_path):
    r = sweep.record.from_json({"source": CAT, "targets": [DOG], "mode": "replace", "reweight": {"bicycle": 2}})
    assert metrics.edited_words(r, DOG) == ["dog", "bicycle"]
    refine = sweep.record.from_json({"source": HOUSE, "targets": [HOUSE + " at winter"], "mode": "refine"})
    assert metrics.edited_words(refine, HOUSE + " at winter") == ["at", "winter"]
    spec = {"base": SPEC["base"], "cases": [{"name": "cat", "source": CAT, "targets": [DOG], "mode": "replace"}],
            "axes": {"seed": [0]}, "region": "attention", "region_threshold": 0.5}
    sweep.sweep(spec, grid.Job(tiny_file, tmp_path / "s", load_model=lambda: load(tiny_file)))
    (row,) = grid.read_results(tmp_path / "s").values()
    region = viz.as_tensor(Image.open(tmp_path / "s" / row["images"]["regions"][0]))[0] > 0.5
    assert 0 < region.float().mean() < 1 and "locality" in row["metrics"][0]
    with pytest.raises(InputError, match="spec.region: one of blend, attention, none"):
        sweep.cells({**spec, "region": "words"})


def test_the_sweep_folder_is_made_with_its_parents(tiny_file, tmp_path, capsys):
    (tmp_path / "spec.json").write_text(json.dumps({**SPEC, "cases": SPEC["cases"][:1], "axes": {"seed": [0]}}))
    out = tmp_path / "sweeps" / "first"
    assert main(["sweep", str(tmp_path / "spec.json"), "--weights", str(tiny_file), "--out", str(out),
                 "--base", "steps=1"]) == 0, capsys.readouterr().err
    assert (out / "results.jsonl").is_file() and not (out / ".p2p-write-test").exists()
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("wrote")] == [
        f"wrote {out / 'results.jsonl'} (+1 cells) and their images in {out / 'cells'}",
        f"wrote {out / 'results.csv'}", f"wrote {out / 'summary.md'}", f"wrote {out / 'sheet-seed.png'}"]
    (row,) = grid.read_results(out).values()             # each image re-runs as a `p2p edit` output does
    target = out / row["images"]["targets"][0]
    assert main(["edit", "--weights", str(tiny_file), "--recipe", str(target), "--out", str(tmp_path / "again.png")]) \
        == 0, capsys.readouterr().err
    with Image.open(tmp_path / "again.png") as again, Image.open(target) as cell:   # the row: source, target
        x = cell.width + sweep.viz.GAP
        assert again.crop((x, 0, x + cell.width, cell.height)).tobytes() == cell.convert("RGB").tobytes()
    (tmp_path / "file").write_text("")
    assert main(["sweep", str(tmp_path / "spec.json"), "--weights", str(tiny_file),
                 "--out", str(tmp_path / "file" / "x")]) == 2
    assert "cannot make the sweep folder" in capsys.readouterr().err


def run_cli(tmp_path, spec, *flags):
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    return main(["sweep", str(tmp_path / "spec.json"), "--out", str(tmp_path / "s"), *flags])


ONE = {**SPEC, "cases": SPEC["cases"][:1], "axes": {"seed": [0, 1]}}


@pytest.mark.parametrize("env, words", [
    ({"RANK": "abc", "WORLD_SIZE": "4"}, "RANK='abc': not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "RANK=0 WORLD_SIZE=0: shard 0 of 0; need 0 <= K < N"),
    ({"RANK": "4", "WORLD_SIZE": "4"}, "RANK=4 WORLD_SIZE=4: shard 4 of 4; need 0 <= K < N"),
    ({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "4"}, "SLURM_ARRAY_TASK_ID='x': not an integer"),
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "four"}, "SLURM_ARRAY_TASK_COUNT='four': not an integer"),
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "0"}, "shard 1 of 0; need 0 <= K < N"),
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "y"},
     "SLURM_ARRAY_TASK_MIN='y': not an integer"),
])
def test_a_bad_shard_in_the_environment_is_one_line(env, words, tiny_file, tmp_path, monkeypatch, capsys):
    for name in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert run_cli(tmp_path, ONE, "--weights", str(tiny_file)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("p2p sweep: error: ") and words in err[0], err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("spec, base, words", [
    ({**ONE, "axes": {"seed": [0, 0]}}, [], "spec.axes.seed[1]: 0 again (as [0]): each cell would run twice"),
    ({**ONE, "axes": {"cross_steps": [0.5, [0.2, 0.4], "0.2:0.4"]}}, [], "spec.axes.cross_steps[2]: 0.2:0.4 again"),
    ({**ONE, "axes": {"seed": [0, 1, 0], "guidance": [5, 6, 5]}, "combine": "zip"}, [],
     "spec.cases[0] (cat, cell 2): the same experiment as cell 0 (cat, seed 0, guidance 5); it would run twice"),
    ({**ONE, "cases": [SPEC["cases"][0], {**SPEC["cases"][0], "name": "again"}]}, [],
     "spec.cases[1] (again, cell 2): the same experiment as cell 0 (cat, seed 0)"),
    (ONE, ["seed=5"], "--base seed: seed is an axis of the spec (spec.axes.seed), which sets it per cell"),
    (ONE, ["source=a cow"], "--base source: spec.cases[0] sets source, and a case's own fields come first"),
    (ONE, ["steps=2", "steps=3"], "--base steps given twice"),
    ({**ONE, "axes": {"seed": list(range(2000)), "guidance": list(range(1000))}}, [],
     "spec: 2,000,000 cells (1 cases x 2,000,000 combinations of the axes), more than a sweep takes (100,000)"),
])
def test_a_cell_never_runs_twice_and_base_never_goes_unheard(spec, base, words, tiny_file, tmp_path, capsys):
    assert run_cli(tmp_path, spec, "--weights", str(tiny_file), *(["--base", *base] if base else [])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "s").exists()


def test_a_large_grid_says_its_size_before_checking_it(tiny_file, tmp_path, capsys):
    spec = {**ONE, "cases": [{**SPEC["cases"][0], "blend": [["cow"], ["dog"]]}], "axes": {"seed": list(range(1000))}}
    assert run_cli(tmp_path, spec, "--weights", str(tiny_file)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "checking cells" not in line]
    assert err[0] == "sweep: checking 1,000 cells" and "word 'cow' is not in the prompt" in err[-1]


def test_a_report_of_no_folder_is_one_line_and_makes_none(tmp_path, capsys):
    assert run_cli(tmp_path, ONE, "--report") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"p2p sweep: error: --out {tmp_path / 's'}: no such folder (the tables are made from a sweep's "
                   "results there)"]
    assert not (tmp_path / "s").exists()


def test_a_second_run_of_a_shard_stops_and_a_killed_ones_lock_blocks_no_one(tiny_file, tmp_path, capsys):
    import os
    import signal
    import subprocess
    import sys
    out = tmp_path / "s"
    out.mkdir()
    # a run of shard 0/1, killed while it holds its lock: the kernel drops the lock with the process
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; from p2p.experiment import grid\n"
                               f"with grid.hold(Path({str(out)!r}), (0, 1)):\n print('held', flush=True); "
                               "time.sleep(600)"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert holder.stdout.readline() == "held\n"
    (tmp_path / "spec.json").write_text(json.dumps(ONE))
    base = ["sweep", str(tmp_path / "spec.json"), "--weights", str(tiny_file), "--out", str(out), "--base", "steps=1"]
    for flags, words in (([], f"shard 0/1 is already running (pid {holder.pid} on "),
                         (["--shard", "1/2"], f"another process runs it in 1 shards (pid {holder.pid} on ")):
        assert main([*base, *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    assert not list(out.glob("results*.jsonl"))
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (out / "results.lock").read_text().startswith(f"pid {holder.pid} on ")   # left behind by the kill
    assert main(base) == 0, capsys.readouterr().err
    assert len((out / "results.jsonl").read_text().splitlines()) == 2 and not (out / "results.lock").exists()


def test_sheets_show_each_distinct_source_and_a_photo_case_its_photo(tmp_path, monkeypatch):
    (tmp_path / "photo.png").write_bytes(b"")
    photo = {"name": "photo", "source": HOUSE, "targets": [HOUSE + " at winter"], "mode": "refine",
             "image": str(tmp_path / "photo.png"), "method": "ddim"}
    spec = {**SPEC, "cases": [SPEC["cases"][0], photo], "axes": {"seed": [0, 1], "self_max_tokens": [0, 256]}}
    every = sweep.cells(spec)
    (tmp_path / "cells").mkdir()
    done = {}
    for c in every:
        names = {"source": f"cells/{c.key}.source.png", "targets": [f"cells/{c.key}.target0.png"]}
        if c.case == "photo":
            names["photo"] = f"cells/{c.key}.photo.png"
        for name in [names["source"], *names["targets"], *([names["photo"]] if "photo" in names else [])]:
            Image.new("RGB", (32, 32)).save(tmp_path / name)
        done[c.key] = {"images": names}
    titles = []
    real = sweep.viz.text_tile
    monkeypatch.setattr(sweep.viz, "text_tile", lambda text, size: titles.append(text) or real(text, size))
    sweep.sheet(spec, every, done, "seed", tmp_path)
    assert titles == ["photo", "generated", "source", "seed = 0", "photo, seed = 1", "generated", "source, seed = 1",
                      "seed = 1"]                 # "generated": the prompt case has no photo
    titles.clear()
    sweep.sheet(spec, every, done, "self_max_tokens", tmp_path)
    assert titles == ["photo", "generated", "source", "self_max_tokens = 0", "self_max_tokens = 256"]


def test_a_photo_case_keeps_its_photo_beside_its_reconstruction(tiny, tiny_file, tmp_path):
    import numpy as np
    pixels = (np.linspace(0, 255, 64)[None, :, None] * np.ones((64, 1, 3))).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    spec = {"base": {"steps": 2, "height": 64, "width": 64, "method": "ddim"}, "axes": {"seed": [0]},
            "cases": [{"name": "photo", "source": HOUSE, "targets": [HOUSE + " at winter"], "mode": "refine",
                       "image": str(tmp_path / "photo.png")}]}
    sweep.sweep(spec, grid.Job(tiny_file, tmp_path / "s", load_model=lambda: tiny))
    (row,) = grid.read_results(tmp_path / "s").values()
    saved = np.asarray(Image.open(tmp_path / "s" / row["images"]["photo"]), dtype=int)
    assert np.abs(saved - pixels).max() <= 1                   # the photo as the model saw it (8-bit round trip)
    assert (np.asarray(Image.open(tmp_path / "s" / row["images"]["source"]), dtype=int) != saved).any()


def native_768(tiny_folder, tmp_path):
    """The tiny diffusers folder with unet/config.json's sample_size 96: a model native to 768 px."""
    import shutil
    folder = tmp_path / "w768"
    shutil.copytree(tiny_folder, folder)
    config = folder / "unet" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"sample_size": 96}))
    return folder


def test_a_sweep_takes_the_models_native_size(tiny_folder, tmp_path, monkeypatch):
    """A case that leaves the size out is planned at the model's size, with the blend resolution that
    scales with it (sweeps used to sample at 512 whatever the model); the check's plans are the
    cells' (sampling at 768 would take a minute)."""
    from p2p.experiment import run
    plans, real = [], run.prepare
    monkeypatch.setattr(run, "prepare", lambda *a, **k: plans.append(real(*a, **k)) or plans[-1])
    spec = {"base": {"steps": 1}, "cases": [SPEC["cases"][0]], "axes": {"seed": [0]}}

    def stop():
        raise KeyboardInterrupt                     # every cell checked: no need to sample

    with pytest.raises(KeyboardInterrupt):
        sweep.sweep(spec, grid.Job(native_768(tiny_folder, tmp_path), tmp_path / "s", load_model=stop))
    (plan,) = plans
    r = plan.record
    assert (r.height, r.width, r.blend_res, r.self_max_tokens) == (768, 768, 24, 576)
