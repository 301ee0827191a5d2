"""`p2p bench pie` on a synthetic PIE-Bench folder: the format, the masks, the scores, the table."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from p2p.eval import metrics, pie
from p2p.experiment import grid
from p2p.cli import main

from conftest import GOLDEN

FAST = ["--base", "steps=3", "height=64", "width=64", "inner_steps=2", "blend_res=8"]


def rle(mask: np.ndarray) -> list[int]:
    """Run-length pairs of a boolean 512 x 512 mask, row-major, as PIE-Bench stores them."""
    flat = np.concatenate([[0], mask.reshape(-1).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(flat))
    return [int(v) for start, end in zip(edges[::2], edges[1::2]) for v in (start, end - start)]


def write_set(folder, items=None):
    """Three items in PIE-Bench's layout: bracketed prompts, RLE masks, one of them covering everything."""
    rng = np.random.default_rng(0)
    box = np.zeros((512, 512), bool)
    box[160:352, 128:384] = True
    full = np.ones((512, 512), bool)
    items = items or {
        "100000000001": dict(image_path="1_change_object_80/1_artificial/100000000001.jpg",
                             original_prompt="a [cat] sitting on a mat", editing_prompt="a [dog] sitting on a mat",
                             editing_instruction="Make the cat a dog", editing_type_id="1", blended_word="cat dog",
                             mask=rle(box)),
        "200000000002": dict(image_path="2_add_object_80/2_natural/200000000002.jpg",
                             original_prompt="a mat on a floor", editing_prompt="a mat on a floor with a [hat]",
                             editing_instruction="Add a hat", editing_type_id="2", blended_word="", mask=rle(box)),
        "900000000003": dict(image_path="9_change_style_80/9_natural/900000000003.jpg",
                             original_prompt="a house by a lake", editing_prompt="a [watercolor] house by a lake",
                             editing_instruction="Make it a watercolor", editing_type_id="9", blended_word="",
                             mask=rle(full)),
    }
    for key, item in items.items():
        path = folder / "annotation_images" / item["image_path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.linspace(0, 255, 512)[None, :, None] * np.ones((512, 1, 3)) * rng.uniform(0.3, 1, 3)
        Image.fromarray(pixels.astype(np.uint8)).save(path, quality=95)
    (folder / "mapping_file.json").write_text(json.dumps(items))
    return folder


# ---- the format ---------------------------------------------------------------------------

def test_run_lengths_decode_to_the_row_major_pixels_they_name():
    mask = pie.decode_mask([5, 2, 512 + 1, 1, 512 * 512 - 1, 10], border=False)
    assert torch.nonzero(mask).tolist() == [[0, 5], [0, 6], [1, 1], [511, 511]]   # the last run is cut at the end
    assert not pie.decode_mask([], border=False).any()
    drawn = np.zeros((512, 512), bool)
    drawn[3:7, 100:260] = drawn[400, :] = True
    assert torch.equal(pie.decode_mask(rle(drawn), border=False), torch.from_numpy(drawn))


def test_the_border_is_edited_as_pie_bench_forces_it():
    mask = pie.decode_mask([], border=True)
    assert mask[0].all() and mask[-1].all() and mask[:, 0].all() and mask[:, -1].all()
    assert mask.sum() == 4 * 512 - 4 and not mask[1:-1, 1:-1].any()


def test_the_mapping_is_read_brackets_stripped_and_bad_entries_named(tmp_path, capsys):
    items, bad = pie.read(write_set(tmp_path))
    cat = items[0]
    assert (cat.source, cat.target, cat.type, cat.blended) == ("a cat sitting on a mat", "a dog sitting on a mat",
                                                                1, ("cat", "dog"))
    assert bad == {}
    r = pie.protocol(cat, "direct")
    assert (r.mode, r.cross_steps, r.self_steps, r.self_max_tokens, r.steps, r.guidance, r.method) == \
        ("refine", 0.4, 0.6, 1024, 50, 7.5, "direct")
    assert r.blend == (("cat",), ("dog",)) and r.reweight == {"dog": 2.0} and r.blend_start == 0.2
    assert pie.protocol(items[1], "ddim").blend == () and pie.protocol(items[1], "ddim").reweight == {}


MASK = "mask: run-length pairs [start, length, ...] of non-negative integers"


@pytest.mark.parametrize("field, value, why", [
    ("mask", [1, 2, 3], MASK),
    ("mask", [True, True], MASK),                                  # bools are ints to Python: not a run
    ("mask", [-5, 10], MASK),
    ("mask", [1000000000, 10], "mask: the run [1000000000, 10] ends past the 512 x 512 grid's 262144 pixels"),
    ("mask", [262140, 5], "mask: the run [262140, 5] ends past"),
    ("blended_word", "cat", "blended_word: 'SOURCE TARGET' or '', got 'cat'"),
    ("blended_word", "a b c", "blended_word: 'SOURCE TARGET' or '', got 'a b c'"),
    ("editing_type_id", "12", "editing_type_id: 0 to 9, got '12'"),
])
def test_one_odd_item_is_skipped_with_its_id_and_why_and_the_rest_read(field, value, why, tmp_path):
    mapping = json.loads((write_set(tmp_path) / "mapping_file.json").read_text())
    mapping["200000000002"][field] = value
    (tmp_path / "mapping_file.json").write_text(json.dumps(mapping))
    items, bad = pie.read(tmp_path)
    assert [i.id for i in items] == ["100000000001", "900000000003"]
    assert list(bad) == ["200000000002"] and bad["200000000002"][1].startswith(why)
    assert bad["200000000002"][0] == (None if field == "editing_type_id" else 2)
    assert pie.select(items, bad, [1], None)[1] == ({"200000000002": bad["200000000002"][1]}
                                                    if field == "editing_type_id" else {})


def test_the_limit_takes_the_first_photos_of_each_type(tmp_path):
    items, bad = pie.read(write_set(tmp_path))
    assert [i.id for i in pie.select(items, bad, [1, 9], None)[0]] == ["100000000001", "900000000003"]
    assert len(pie.select(items, bad, None, 1)[0]) == 3


# ---- the scores ---------------------------------------------------------------------------

def test_background_scores_mask_both_images_over_the_whole_image():
    a = torch.full((3, 16, 16), 0.5, dtype=torch.float64)
    b = a.clone()
    b[:, 8:12, 8:12] = 1.0                         # inside the edit region: not counted
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[8:12, 8:12] = True
    inside = pie.score(a, b, mask, "x", metrics.Nets())
    assert inside["mse"] == 0 and inside["psnr"] == math.inf and inside["ssim"] == pytest.approx(1.0)
    b[:, 0, 0] = 0.0                               # one background pixel off by 0.5 in each channel
    outside = pie.score(a, b, mask, "x", metrics.Nets())
    assert outside["mse"] == pytest.approx(0.25 / 256)           # over all 16 x 16 pixels, the masked ones too
    assert outside["psnr"] == pytest.approx(10 * math.log10(256 / 0.25))
    assert metrics.mse(a, b, mask) == pytest.approx(0.25 / 240)  # the sweep's region metric counts 240 pixels
    everything = pie.score(a, b, torch.ones(16, 16, dtype=torch.bool), "x", metrics.Nets())
    assert all(math.isnan(everything[k]) for k in ("psnr", "mse", "ssim")) and "lpips" not in everything


def test_pie_dino_sees_0_to_255_through_the_imagenet_normalisation(nets):
    dino = metrics.Dino.load(nets / metrics.DINO_FOLDER)
    image = torch.rand(3, 64, 48, dtype=torch.float64)
    x = dino.pixels(image, pie=True)
    assert x.shape == (1, 3, 42, 32)               # short side to the model's 32, long side int(32 * 64 / 48)
    plain = torch.nn.functional.interpolate(image.float()[None], size=(42, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(x[0, 0], (plain[0, 0] * 255 - 0.485) / 0.229, atol=1e-3)
    assert dino.distance(image, image.flip(-1), pie=True) != dino.distance(image, image.flip(-1))


# ---- the command ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
    """The LPIPS weights of tests/golden/lpips.safetensors (random trunk, real lin layers) alone."""
    from safetensors.torch import load_file, save_file
    path = tmp_path_factory.mktemp("lpips") / "lpips-squeeze.safetensors"
    save_file({k: v for k, v in load_file(GOLDEN / "lpips.safetensors").items() if not k.startswith("golden.")}, path)
    return path


def test_the_synthetic_set_runs_for_all_methods_and_the_table_is_its_results(tiny_file, nets, lpips_file, tmp_path,
                                                                             capsys):
    data, out = write_set(tmp_path / "pie"), tmp_path / "out"
    base = ["bench", "pie", "--data", str(data), "--weights", str(tiny_file), "--out", str(out), *FAST,
            "--clip", str(nets / metrics.CLIP_FOLDER), "--dino", str(nets / metrics.DINO_FOLDER),
            "--lpips", str(lpips_file)]
    assert main(base) == 0, capsys.readouterr().err
    printed = capsys.readouterr()
    assert "note:" not in printed.err and "| Direct + P2P |" in printed.out
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["id"], r["method"]) for r in rows) == sorted(
        (i, m) for i in ("100000000001", "200000000002", "900000000003") for m in pie.METHODS)
    items = {i.id: i for i in pie.read(data)[0]}
    for r in rows:                                 # the background scores, recomputed from the saved images by hand
        photo, edit = (np.asarray(Image.open(out / r["images"][k]), dtype=np.float64) / 255 for k in ("photo", "edit"))
        keep = ~pie.mask_at(items[r["id"]], 64).numpy()[..., None]
        if r["id"] == "900000000003":
            assert math.isnan(r["metrics"]["mse"])
            continue
        mse = ((photo * keep - edit * keep) ** 2).mean()
        assert r["metrics"]["mse"] == pytest.approx(mse, rel=1e-9)
        assert r["metrics"]["psnr"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-9)
        assert r["seconds"] > 0 and set(r["metrics"]) >= {"structure", "clip_whole", "clip_edited", "ssim", "lpips"}
    table = (out / "table.md").read_text()
    direct = [r for r in rows if r["method"] == "direct"]
    line = next(l for l in table.splitlines() if l.startswith("| Direct + P2P |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == f"{np.mean([r['metrics']['structure'] for r in direct]) * 1e3:.2f}"
    assert cells[2] == f"{np.mean([r['metrics']['psnr'] for r in direct if not math.isnan(r['metrics']['psnr'])]):.2f}"
    assert cells[-1] == "3"
    assert "(the mask covers the whole image): DDIM 1, Null-text 1, Negative-prompt 1, Direct 1." in table
    assert "## 1. change object (1 photos)" in table and "## 9. change style (1 photos)" in table
    with Image.open(out / "sheet.png") as sheet:
        assert sheet.width > 9 * 160 and sheet.height > 3 * 160      # photo + 4 x (reconstruction, edit), 3 rows
    recon = {r["method"]: np.asarray(Image.open(out / r["images"]["reconstruction"])) for r in rows
             if r["id"] == "100000000001"}
    assert (recon["direct"] != recon["ddim"]).any()   # the offsets move the source row
    # a rerun has nothing left to do
    assert main(base) == 0
    assert "0 to run" in capsys.readouterr().err


def test_shards_take_their_cells_and_the_report_joins_them(tiny_file, tmp_path, capsys):
    data, out = write_set(tmp_path / "pie"), tmp_path / "out"
    base = ["bench", "pie", "--data", str(data), "--weights", str(tiny_file), "--out", str(out), *FAST,
            "--methods", "ddim,negative-prompt", "--types", "1,2", "--clip", "none", "--dino", "none",
            "--lpips", "none"]
    for k in range(2):
        assert main([*base, "--shard", f"{k}/2"]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.glob("results*.jsonl")) == ["results.0-of-2.jsonl", "results.1-of-2.jsonl"]
    assert main([*base, "--report"]) == 0
    table = (out / "table.md").read_text()
    assert "2 of 2 photos done by ddim, negative-prompt." in table and "| DDIM + P2P |" in table


def test_a_blended_word_missing_from_its_prompt_skips_the_photo_with_why(tiny_file, tmp_path, capsys):
    data = write_set(tmp_path / "pie")
    mapping = json.loads((data / "mapping_file.json").read_text())
    mapping["100000000001"]["blended_word"] = "cats dog"
    (data / "mapping_file.json").write_text(json.dumps(mapping))
    out = tmp_path / "out"
    assert main(["bench", "pie", "--data", str(data), "--weights", str(tiny_file), "--out", str(out), *FAST,
                 "--methods", "ddim", "--types", "1,2", "--clip", "none", "--dino", "none", "--lpips", "none"]) == 0
    table = (out / "table.md").read_text()
    assert "1 photos skipped before sampling: 100000000001: " in table and "'cats' is not in the prompt" in table
    assert "1 of 1 photos done by ddim; 1 photos skipped (below)" in table


def test_no_inversion_is_left_behind_and_absent_lpips_has_no_column(tiny_file, tmp_path, capsys):
    data, out = write_set(tmp_path / "pie"), tmp_path / "out"
    assert main(["bench", "pie", "--data", str(data), "--weights", str(tiny_file), "--out", str(out), *FAST,
                 "--methods", "null-text", "--types", "1,9", "--clip", "none", "--dino", "none", "--lpips", "none"]) == 0
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("wrote")] == [
        f"wrote {out / 'results.jsonl'} (+2 cells) and their images in {out / 'cells'}", f"wrote {out / 'table.md'}",
        f"wrote {out / 'sheet.png'}"]                  # every file named, and no inversion among them
    assert not (out / "inversions").exists()
    table = (out / "table.md").read_text()
    assert "LPIPS ×10³" not in table and "| Null-text + P2P | - | - | - |" in table   # type 9: all masked


def test_the_photos_are_edited_at_the_models_native_size(tiny_folder, tmp_path, monkeypatch):
    """The protocol's records leave the size to the model: a model native to 768 px (unet/config.json's
    sample_size 96) edits at 768, with the blend resolution that scales with it, as the check plans it."""
    import shutil
    from p2p.experiment import run
    folder = tmp_path / "w768"
    shutil.copytree(tiny_folder, folder)
    config = folder / "unet" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"sample_size": 96}))
    plans, real = [], run.prepare
    monkeypatch.setattr(run, "prepare", lambda *a, **k: plans.append(real(*a, **k)) or plans[-1])
    _, every, skipped = pie.plan(write_set(tmp_path / "pie"), [1], None, ["ddim"], {"steps": 1},
                                 grid.Job(folder, tmp_path / "out"))
    assert [c.record.height for c in every] == [None] and skipped == {}
    (plan,) = plans
    assert (plan.record.height, plan.record.width, plan.record.blend_res) == (768, 768, 24)


@pytest.mark.parametrize("base, words", [
    (["height=63"], "p2p bench: error: --base.height: must be a positive multiple of 8, got 63"),
    (["height=128"], "p2p bench: error: --base: photos are edited square, got width 64 and height 128"),
    (["sampler=plms"], "p2p bench: error: --base.sampler plms cannot edit a photo"),
    (["method=ddim"], "p2p bench: error: --base method: each photo's --methods sets it, give --methods"),
    (["source=a dog"], "p2p bench: error: --base source: each photo's original_prompt sets it"),
    (["steps=2", "steps=3"], "p2p bench: error: --base steps given twice"),
])
def test_a_bad_base_is_refused_up_front_not_found_in_every_photo(base, words, tiny_file, tmp_path, capsys):
    data, out = write_set(tmp_path / "pie"), tmp_path / "out"
    code = main(["bench", "pie", "--data", str(data), "--weights", str(tiny_file), "--out", str(out),
                 "--base", "width=64", *base, "--methods", "ddim"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(words), err
    assert not out.exists()


def test_no_photo_left_and_a_report_of_no_folder_are_refused(tiny_file, tmp_path, capsys):
    data, out = write_set(tmp_path / "pie"), tmp_path / "out"
    mapping = json.loads((data / "mapping_file.json").read_text())
    mapping["100000000001"]["blended_word"] = "cats dog"
    (data / "mapping_file.json").write_text(json.dumps(mapping))
    base = ["bench", "pie", "--data", str(data), "--weights", str(tiny_file), "--out", str(out), *FAST,
            "--methods", "ddim"]
    assert main([*base, "--types", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("p2p bench: error: no photo left to edit: all 1 skipped "
                                               "(100000000001: "), err
    assert main([*base, "--report"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"p2p bench: error: --out {out}: no such folder (the tables are made from a run's results there)"]
    assert not out.exists()


def test_the_sheet_shows_the_prompts(tmp_path, monkeypatch):
    (tmp_path / "cells").mkdir()
    rows = []
    for id_, t in (("100000000001", 1), ("200000000002", 2)):
        names = {k: f"cells/{id_}.{k}.png" for k in ("photo", "reconstruction", "edit")}
        for name in names.values():
            Image.new("RGB", (64, 64), (id_[0] == "1") * 255).save(tmp_path / name)
        rows.append({"id": id_, "type": t, "method": "ddim", "images": names,
                     "record": {"source": f"source {id_}", "targets": [f"target {id_}"]}})
    labels = []
    real = pie.viz.labelled_row
    monkeypatch.setattr(pie.viz, "labelled_row", lambda tiles, names: labels.append(names) or real(tiles, names))
    assert pie.sheet(rows, ["ddim"], tmp_path) == tmp_path / "sheet.png"
    assert labels == [["", "source 100000000001", "DDIM: reconstruction", "DDIM: target 100000000001"],
                      ["", "source 200000000002", "DDIM: reconstruction", "DDIM: target 200000000002"]]
