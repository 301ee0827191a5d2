"""`p2p edit`, `p2p maps` and the paper script end to end on the tiny checkpoint, and bad input."""
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from p2p.cli import main

from conftest import script

FAST = ["--steps", "4", "--height", "128", "--width", "128"]
CAT, DOG, HORSE = "a cat riding a bicycle", "a dog riding a bicycle", "a horse riding a bicycle"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_edit_writes_images_latents_maps_and_metadata(tiny_file, tmp_path, capsys):
    out, lat, maps = tmp_path / "e.png", tmp_path / "e.safetensors", tmp_path / "m.png"
    code, err = run(capsys, "edit", "--weights", tiny_file, "--source", CAT, "--target", DOG, "--target", HORSE,
                    "--mode", "replace", "--blend", "cat", "dog", "horse", "--reweight", "dog=2",
                    "--word-steps", "dog=0.2:0.6", *FAST, "--out", out, "--latents-out", lat, "--maps-out", maps)
    assert code == 0, err
    latents = load_file(lat)["latents"]
    assert latents.shape == (3, 4, 16, 16) and latents.dtype == torch.float32
    image = Image.open(out)
    assert image.width >= 3 * 128
    assert image.text["mode"] == "replace" and json.loads(image.text["targets"]) == [DOG, HORSE]
    assert json.loads(image.text["blend"]) == [["cat"], ["dog"], ["horse"]]
    record = json.loads(image.text["experiment"])            # the whole record, every field
    assert record["targets"] == [DOG, HORSE] and record["word_steps"] == {"dog": [0.2, 0.6]}
    assert record["reweight"] == {"dog": 2.0} and record["steps"] == 4 and record["image"] is None
    grid = Image.open(maps)
    assert grid.height > 3 * 160 and grid.width > 5 * 160     # 3 prompts, image + 5 tokens each


@pytest.mark.parametrize("mode, extra", [("replace", []), ("refine", []), ("reweight", ["--reweight", "cat=3"])])
def test_each_mode_changes_the_target_but_never_the_source(mode, extra, tiny_file, tmp_path, capsys):
    target = CAT if mode == "reweight" else ("a cat riding a red bicycle" if mode == "refine" else DOG)
    code, err = run(capsys, "edit", "--weights", tiny_file, "--source", CAT, "--target", target, "--mode", mode,
                    *extra, *FAST, "--out", tmp_path / "e.png", "--latents-out", tmp_path / "e.safetensors")
    assert code == 0, err
    code, err = run(capsys, "generate", "--weights", tiny_file, "--prompt", CAT, "--prompt", target, *FAST,
                    "--out", tmp_path / "g.png", "--latents-out", tmp_path / "g.safetensors")
    edited, plain = load_file(tmp_path / "e.safetensors")["latents"], load_file(tmp_path / "g.safetensors")["latents"]
    assert torch.allclose(edited[0], plain[0], atol=1e-4 * plain.abs().max())   # the source is untouched
    assert (edited[1] - plain[1]).abs().max() > 1e-2                             # the target is edited


def test_maps_command(tiny_file, tmp_path, capsys):
    out = tmp_path / "maps.png"
    code, err = run(capsys, "maps", "--weights", tiny_file, "--prompt", CAT, "--steps-range", "1:3", *FAST,
                    "--out", out)
    assert code == 0, err
    image = Image.open(out)
    assert image.text["steps_range"] == "1:3" and image.width > 6 * 160
    code, err = run(capsys, "maps", "--weights", tiny_file, "--prompt", CAT, "--components", "3", *FAST,
                    "--out", out)
    assert code == 0, err
    assert Image.open(out).height > 2 * 160     # a second row: the self-attention components


@pytest.mark.parametrize("argv, words", [
    (["--mode", "replace", "--target", "a big dog riding a bicycle"], "the source has 5 and the target 6"),
    (["--mode", "replace", "--target", DOG, "--blend", "cat"], "one word list per prompt (2), got 1"),
    (["--mode", "replace", "--target", DOG, "--blend", "cat", "cow"], "word 'cow' is not in the prompt"),
    (["--mode", "replace", "--target", DOG, "--reweight", "cow=2"], "re-weighted word 'cow' is in no target"),
    (["--mode", "replace", "--target", DOG, "--reweight", "dog"], "--reweight: takes WORD=VALUE"),
    (["--mode", "replace", "--target", DOG, "--word-steps", "cow=0.2"], "'cow' of a step window is in no target"),
    (["--mode", "replace", "--target", DOG, "--cross-steps", "1.5"], "a fraction of the steps lies in [0, 1]"),
    (["--mode", "reweight", "--target", CAT], "--mode reweight needs at least one --reweight"),
    (["--mode", "replace", "--target", DOG, "--blend", "cat", "dog", "--blend-res", "32"],
     "blend_res (--blend-res) 32: at 128x128 this model has down/up cross-attention at resolutions [16, 8, 4] only"),
    (["--mode", "refine", "--target", "a cat riding a red bicycle", "--replace-mapper", "official"],
     "--mode refine has no replace mapper"),
    (["--mode", "replace", "--target", DOG, "--blend-subtract", "cat", "dog"], "give --blend WORDS too"),
    (["--mode", "replace", "--target", DOG, "--blend", "cat", "dog", "--blend-start", "1.5"],
     "a fraction of the steps lies in [0, 1], got 1.5"),
    (["--mode", "replace", "--target", DOG, "--blend", "cat", "dog", "--blend-subtract", "cow", "dog"],
     "word 'cow' is not in the prompt"),
    (["--mode", "replace", "--target", DOG, "--sampler", "euler"], "--sampler: one of ddim, plms, got 'euler'"),
])
def test_bad_edit_input_is_one_line_before_sampling(argv, words, tiny_file, tmp_path, capsys):
    out = tmp_path / "e.png"
    code, err = run(capsys, "edit", "--weights", tiny_file, "--source", CAT, *argv, *FAST, "--out", out)
    assert code == 2
    assert words in err and "sampling" not in err, err
    assert err.strip().splitlines()[-1].startswith("p2p edit: error:") and "Traceback" not in err
    assert not out.exists()


def test_plms_edit_records_its_sampler_mapper_and_blend(tiny_file, tmp_path, capsys):
    out, lat = tmp_path / "e.png", tmp_path / "e.safetensors"
    words = ["--source", "a squirrel eating a burger", "--target", "a squirrel eating a tiramisu",
             "--mode", "replace", "--blend", "burger", "tiramisu", "--blend-threshold", "0.75"]
    code, err = run(capsys, "edit", "--weights", tiny_file, *words, "--sampler", "plms", "--replace-mapper",
                    "official", "--blend-start", "0.5", "--blend-subtract", "squirrel", "squirrel", *FAST,
                    "--out", out, "--latents-out", lat)
    assert code == 0, err
    assert "sampling: 100%" in err and "5/5 [" in err            # 4 steps, 5 UNet calls
    meta = Image.open(out).text
    assert (meta["sampler"], meta["replace_mapper"], meta["blend_start"]) == ("plms", "official", "0.5")
    assert json.loads(meta["blend_subtract"]) == [["squirrel"], ["squirrel"]]
    latents = {}
    for extra in ([], ["--blend-subtract", "squirrel", "squirrel"]):   # the subtraction changes the result
        code, err = run(capsys, "edit", "--weights", tiny_file, *words, "--sampler", "plms", "--blend-start", "0.5",
                        *extra, *FAST, "--out", out, "--latents-out", lat)
        assert code == 0, err
        latents[bool(extra)] = load_file(lat)["latents"]
    assert not torch.equal(latents[True], latents[False])
    assert torch.equal(latents[True][0], latents[False][0])      # never the source


def test_paper_script_smoke_test_on_the_tiny_model(tmp_path):
    paper = script("reproduce_paper")
    assert paper.main(["--tiny", "--only", "squirrel-lasagna", "--only", "stable-10-lasagne-local",
                       "--only", "nulltext-08-tiger", "--out", str(tmp_path)]) == 0
    for name in ("squirrel-lasagna", "stable-10-lasagne-local"):
        assert (tmp_path / f"{name}.png").is_file() and (tmp_path / f"{name}-maps.png").is_file()
    baseline = Image.open(tmp_path / "stable-10-lasagne-local-baseline.png")   # run_baseline=True: no edit
    edited = Image.open(tmp_path / "stable-10-lasagne-local.png")
    assert baseline.text["software"] == "p2p generate" and edited.text["software"] == "p2p edit"
    assert (edited.text["sampler"], edited.text["replace_mapper"], edited.text["seed"]) == ("plms", "official", "8888")
    page = (tmp_path / "index.html").read_text()
    assert "squirrel-lasagna.png" in page and "stable-10-lasagne-local-baseline.png" in page
    assert "p2p generate --weights" in page and "--sampler plms" in page and "--word-steps lasagne=0.2" in page
    assert "skipped: needs the photo gnochi_mirror.jpeg in --photos" in page
    assert not (tmp_path / "nulltext-08-tiger.png").exists()


def test_every_manifest_entry_is_a_valid_record_and_its_shown_command_gives_it_back(tiny_file, tmp_path):
    """Each entry of both manifests is a record whose edit is prepared against the model (all its
    words exist, its layers too), and the command the index page shows parses back to that very
    record; nothing is sampled."""
    from models.checkpoint import load
    from p2p import cli, commands
    paper, architecture = script("reproduce_paper"), load(tiny_file, "meta")
    for manifest in paper.MANIFESTS:
        for i, ex in enumerate(paper.load(manifest)["examples"]):
            if "image" in ex:
                Image.new("RGB", (600, 600)).save(tmp_path / ex["image"])
            runs = paper.plan(ex, f"{manifest}[{i}]", tmp_path, tmp_path, ["--weights", "w.safetensors"], tiny_file,
                              architecture)
            assert runs[-1][0] == f"{ex['name']}.png" and len(runs) == 1 + bool(ex.get("baseline"))
            for image, kind, what, shown in runs:
                args = cli.parse(shown)
                assert args.command == kind
                if kind == "edit":
                    assert what.edit.b == 1 + len(ex["targets"]) and (what.edit.blend is not None) == ("blend" in ex)
                    assert commands.record_of(args) == what.record


def test_the_official_manifest_covers_every_rendering_cell_as_the_notebooks_set_them():
    examples = script("reproduce_paper").load("official")["examples"]
    stable = [e for e in examples if e["notebook"] == "prompt-to-prompt_stable.ipynb"]
    null_text = [e for e in examples if e["notebook"] == "null_text_w_ptp.ipynb"]
    assert [e["cell"] for e in stable] == list(range(6, 21)) and [e["cell"] for e in null_text] == [8, 9, 10]
    for e in stable:   # the checkpoint's PNDM, x_t from manual_seed(8888), 50 steps at 7.5, blend from update 0
        assert (e["sampler"], e["seed"], e["steps"], e["guidance"]) == ("plms", 8888, 50, 7.5)
        assert "blend_start" not in e and "self_max_tokens" not in e
        assert e.get("replace_mapper") == ("official" if e.get("mode") == "replace" else None)
    for e in null_text:   # DDIM from the photo's null-text inversion, blend from update int(0.2 * 50)
        assert (e["sampler"], e["image"], e["offsets"], e["self_max_tokens"]) == ("ddim", "gnochi_mirror.jpeg",
                                                                                 "0,0,200,0", 1024)
        assert e.get("blend_start", 0.2) == 0.2 and e["method"] == "null-text"
    assert [e["name"] for e in examples if e.get("baseline")] == ["stable-07-lion", "stable-10-lasagne-local"]
