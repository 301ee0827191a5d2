"""The experiment record (p2p/experiment/record.py): JSON in and out, errors with paths, the CLI's road
through it, and `p2p edit --recipe` re-running a result exactly."""
import json

import pytest
import torch
from safetensors.torch import load_file

from models import InputError
from p2p import cli, commands
from p2p.experiment import record
from p2p.experiment.record import Experiment

CAT, DOG = "a cat riding a bicycle", "a dog riding a bicycle"
FAST = ["--steps", "4", "--height", "128", "--width", "128"]


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_json_values_are_made_canonical_and_round_trip():
    r = record.from_json({"source": CAT, "targets": [DOG], "mode": "replace", "cross_steps": [0.1, 0.7],
                          "word_steps": {"dog": "0:0.4"}, "blend": ["cat", "dog,bicycle"], "offsets": "1,2,3,4",
                          "steps": "10", "reweight": {"dog": 2}})
    assert r.cross_steps == (0.1, 0.7) and r.word_steps == {"dog": (0.0, 0.4)}
    assert r.blend == (("cat",), ("dog", "bicycle")) and r.offsets == (1, 2, 3, 4) and r.steps == 10
    assert r.reweight == {"dog": 2.0} and r.prompts == [CAT, DOG]
    assert record.from_json(r.to_json()) == r
    assert json.loads(json.dumps(r.to_json()))["blend"] == [["cat"], ["dog", "bicycle"]]


@pytest.mark.parametrize("change, words", [
    ({"colour": "red"}, "spec[3]: unknown field 'colour' (the fields are source, targets, mode,"),
    ({"cross_steps": "x"}, "spec[3].cross_steps: not a number: 'x'"),
    ({"cross_steps": [0.6, 0.2]}, "spec[3].cross_steps: step window 0.6:0.2 ends before it starts"),
    ({"self_steps": 1.5}, "spec[3].self_steps: a fraction of the steps lies in [0, 1], got 1.5"),
    ({"seed": 2 ** 64}, "spec[3].seed: must lie in 0..2**64-1"),
    ({"steps": True}, "spec[3].steps: not an integer: True"),
    ({"guidance": float("nan")}, "spec[3].guidance: must be a finite number"),
    ({"mode": "swap"}, "spec[3].mode: one of replace, refine, reweight, got 'swap'"),
    ({"targets": "a dog"}, "spec[3].targets: a non-empty list of strings"),
    ({"reweight": ["dog"]}, "spec[3].reweight: takes WORD=VALUE, got 'dog'"),
    ({"reweight": 2}, "spec[3].reweight: a {word: value} object"),
    ({"height": 100}, "spec[3].height: must be a positive multiple of 8, got 100"),
    ({"mode": "refine", "replace_mapper": "official"},
     "spec[3].replace_mapper is the word swap's; spec[3].mode refine has no replace mapper"),
    ({"image": "cat.png", "sampler": "plms"}, "spec[3].sampler plms cannot edit a photo"),
    ({"blend_start": 0.2}, "spec[3].blend_start shapes a local blend: give spec[3].blend WORDS (or"),
    ({"blend": ["cat", "dog"], "blend_mask": "m.png"}, "spec[3].blend words or spec[3].blend_mask"),
])
def test_bad_records_name_the_offending_entry(change, words):
    with pytest.raises(InputError) as e:
        record.from_json({"source": CAT, "targets": [DOG], "mode": "replace", **change}, "spec[3]")
    assert words in str(e.value)
    with pytest.raises(InputError, match="spec.mode is missing"):
        record.from_json({"source": CAT, "targets": [DOG]}, "spec")


def test_the_flags_defaults_are_the_records():
    args = cli.parse(["edit", "--weights", "w.safetensors", "--source", CAT, "--target", DOG, "--mode", "replace",
                      "--out", "o.png"])
    assert commands.record_of(args) == Experiment(CAT, (DOG,), "replace")


def test_command_line_gives_the_record_back():
    r = record.from_json({"source": CAT, "targets": [DOG, "a horse riding a bicycle"], "mode": "replace",
                          "cross_steps": [0.1, 0.7], "word_steps": {"dog": [0.0, 0.4], "horse": 0.3},
                          "self_steps": 0.5, "self_max_tokens": 1024, "blend": [["cat"], ["dog"], ["horse", "a"]],
                          "blend_threshold": 0.5, "blend_res": 8, "blend_start": 0.2,
                          "blend_subtract": [["bicycle"], ["bicycle"], ["bicycle"]], "reweight": {"dog": -1.5},
                          "replace_mapper": "official", "seed": 2 ** 64 - 1, "steps": 7, "guidance": 3.0,
                          "height": 64, "width": 192, "image": "my photo.png", "inversion": "inv.safetensors",
                          "method": "ddim", "inner_steps": 3, "offsets": [0, 1, 2, 3],
                          "cross_sites": "up:16,down:any", "self_sites": [["mid", 4]]})
    argv = ["edit", "--weights", "w", *cli.command_line(r), "--out", "o.png"]
    assert commands.record_of(cli.parse(argv)) == r
    plain = Experiment(CAT, (DOG,), "refine")
    assert cli.command_line(plain) == ["--source", CAT, "--target", DOG, "--mode", "refine"]


def test_recipe_reruns_a_result_exactly_and_flags_change_single_fields(tiny_file, tmp_path, capsys):
    first = ["edit", "--weights", tiny_file, "--source", CAT, "--target", DOG, "--mode", "replace",
             "--blend", "cat", "dog", "--blend-threshold", "0.6", "--reweight", "dog=2", "--word-steps", "dog=0.1:0.6",
             "--sampler", "plms", "--seed", "7", *FAST]
    code, err = run(capsys, *first, "--out", tmp_path / "a.png", "--latents-out", tmp_path / "a.safetensors")
    assert code == 0, err
    a = load_file(tmp_path / "a.safetensors")["latents"]
    for recipe in ("a.png", "a.safetensors"):
        code, err = run(capsys, "edit", "--weights", tiny_file, "--recipe", tmp_path / recipe,
                        "--out", tmp_path / "b.png", "--latents-out", tmp_path / "b.safetensors")
        assert code == 0, err
        assert torch.equal(load_file(tmp_path / "b.safetensors")["latents"], a)
    saved = commands.output.read_metadata(tmp_path / "a.png")["experiment"]
    (tmp_path / "r.json").write_text(saved)
    code, err = run(capsys, "edit", "--weights", tiny_file, "--recipe", tmp_path / "r.json", "--seed", "8",
                    "--blend", "cat", "dog,bicycle", "--out", tmp_path / "c.png")
    assert code == 0, err
    changed = json.loads(commands.output.read_metadata(tmp_path / "c.png")["experiment"])
    assert {k for k in changed if changed[k] != json.loads(saved)[k]} == {"seed", "blend"}
    assert changed["seed"] == 8 and changed["blend"] == [["cat"], ["dog", "bicycle"]]


def test_bad_recipes_are_one_line(tiny_file, tmp_path, capsys):
    code, err = run(capsys, "generate", "--weights", tiny_file, "--prompt", CAT, *FAST, "--out", tmp_path / "g.png")
    assert code == 0, err
    (tmp_path / "bad.json").write_text('{"source": "a cat", "targets": ["a dog"], "mode": "replace", "seed": -1}')
    for recipe, words in (("g.png", "holds no experiment record"), ("none.png", "does not exist"),
                          ("bad.json", "--seed: must lie in 0..2**64-1, got -1")):
        code, err = run(capsys, "edit", "--weights", tiny_file, "--recipe", tmp_path / recipe,
                        "--out", tmp_path / "x.png")
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    code, err = run(capsys, "edit", "--weights", tiny_file, "--target", DOG, "--mode", "replace",
                    "--out", tmp_path / "x.png")
    assert code == 2 and "--source is required (or give --recipe)" in err, err
    code, err = run(capsys, "edit", "--weights", tiny_file, "--source", CAT, "--mode", "replace",
                    "--out", tmp_path / "x.png")
    assert code == 2 and "--target is required (or give --recipe)" in err, err
    assert not (tmp_path / "x.png").exists()
