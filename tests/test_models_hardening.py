"""What a new user's first runs hit: odd files, odd sizes, odd step counts, broken checkpoints.

Every refusal must be an InputError that names the problem, never a KeyError or a traceback
from deep inside torch, safetensors or transformers.
"""
import json
import logging
import pickle
import random
import shutil
import struct
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import InputError, files
from models.attention import Site
from models.checkpoint import load, prediction_of
from models.files import read_safetensors
from models.text import check_prompts, load_tokenizer
from models.unet import UNet
from p2p.cli import main
from p2p.sampler import generate

from conftest import script

make_tiny = script("make_tiny")


def state(sd):
    return {**{f"unet.{k}": v for k, v in sd.unet.state_dict().items()},
            **{f"vae.{k}": v for k, v in sd.vae.state_dict().items()},
            **{f"text.{k}": v for k, v in sd.text.model.state_dict().items()}}


# ---- safetensors recognised by its structure, pickles by their magic ---------------------

def pad_header(src, dst, low_byte: int):
    """Rewrite `src` with its JSON header padded by trailing spaces (the format allows it) until
    the header length's low byte, the file's first byte, is `low_byte`."""
    data = src.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = data[8:8 + n].rstrip(b" ")
    padded = header + b" " * ((low_byte - len(header)) % 256)
    dst.write_bytes(struct.pack("<Q", len(padded)) + padded + data[8 + n:])


def test_header_length_with_low_byte_0x80_is_safetensors_not_a_pickle(tiny_file, tiny, tmp_path):
    odd = tmp_path / "odd.safetensors"
    pad_header(tiny_file, odd, 0x80)
    assert odd.read_bytes()[0] == 0x80 and struct.unpack("<Q", odd.read_bytes()[:8])[0] % 256 == 0x80
    assert load_file(odd).keys() == load_file(tiny_file).keys()      # safetensors itself reads it
    sd = load(odd)
    a, b = state(tiny), state(sd)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x, ctx = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), tiny.text.encode(["a cat"])
    with torch.no_grad():
        assert torch.equal(sd.unet(x, 500, ctx), tiny.unet(x, 500, ctx))


@pytest.mark.parametrize("kind", ["pickle protocol 2", "pickle protocol 4", "pickle protocol 5", "torch.save zip"])
def test_pickle_and_zip_magic_under_a_safetensors_name_are_refused(kind, tmp_path):
    path = tmp_path / "disguised.safetensors"
    if kind == "torch.save zip":
        torch.save({"state_dict": {"w": torch.zeros(1)}}, path)
        assert path.read_bytes()[:4] == b"PK\x03\x04"
    else:
        path.write_bytes(pickle.dumps({"w": [0.0] * 100}, protocol=int(kind[-1])))
        assert path.read_bytes()[:2] == bytes([0x80, int(kind[-1])])
    with pytest.raises(InputError, match="is a pickle checkpoint: p2p never unpickles"):
        load(path)


def test_pickle_suffix_is_refused_even_with_safetensors_inside(tiny_file, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    shutil.copy(tiny_file, ckpt)
    with pytest.raises(InputError, match="model.ckpt is a pickle checkpoint"):
        load(ckpt)


def test_other_bytes_are_not_a_readable_safetensors_file(tmp_path):
    for name, data in [("text", b"hello, this is not a checkpoint"), ("empty", b""),
                       ("long header", struct.pack("<Q", 10 ** 9) + b"{}")]:
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with pytest.raises(InputError, match=r"not a readable \.safetensors file \(no safetensors header\)"):
            load(path)


# ---- sizes that are multiples of 8 but not of 64 -------------------------------------------

@torch.no_grad()
def test_unet_runs_at_latents_9x25_and_1x25(tiny):
    ctx = tiny.text.encode(["a cat"])
    for h, w in [(9, 25), (1, 25), (25, 9), (3, 5)]:
        eps = tiny.unet(torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(0)), 500, ctx)
        assert eps.shape == (1, 4, h, w) and torch.isfinite(eps).all()


@torch.no_grad()
def test_unet_runs_at_latents_1x1(tiny):
    """8x8 pixels. The tiny model's first GroupNorm has one channel per group, and torch refuses
    one value per group, so the tiny weights go into a UNet with 16 groups (same shapes)."""
    unet = UNet(replace(tiny.unet.cfg, groups=16)).eval()
    unet.load_state_dict(tiny.unet.state_dict())
    eps = unet(torch.randn(2, 4, 1, 1, generator=torch.Generator().manual_seed(0)), 500, tiny.text.encode(["a", "b"]))
    assert eps.shape == (2, 4, 1, 1) and torch.isfinite(eps).all()


def test_generate_at_200x72_agrees_in_both_layouts(tiny_file, tiny_folder):
    a = generate(load(tiny_file), ["a cat"], steps=2, height=72, width=200, progress=False)
    b = generate(load(tiny_folder), ["a cat"], steps=2, height=72, width=200, progress=False)
    assert a.shape == (1, 4, 9, 25) and torch.isfinite(a).all()
    assert torch.equal(a, b)


class Recorder:
    """An edit that wants no site and notes each site's name and the size it ran at."""

    def __init__(self):
        self.seen = {}

    def wants(self, site: Site) -> bool:
        self.seen[site.name] = site.res
        return False


@torch.no_grad()
def test_sites_report_the_sizes_each_level_runs_at_9x25(tiny):
    sites = tiny.unet.sites(9, 25)
    sizes = {s.level: s.res for s in sites}
    assert sizes == {0: (9, 25), 1: (5, 13), 2: (3, 7), 3: (2, 4)}   # stride-2 convs round up
    recorder = Recorder()
    tiny.unet(torch.zeros(1, 4, 9, 25), 500, tiny.text.encode(["a cat"]), edit=recorder)
    assert recorder.seen == {s.name: s.res for s in sites}


# ---- malformed checkpoints name what is missing or broken --------------------------------

def refused(tensors: dict, path, what: str) -> str:
    """Save `tensors`, load them, and return the InputError's message; anything else fails."""
    save_file(tensors, str(path))
    try:
        load(path)
    except InputError as e:
        return str(e)
    except Exception as e:   # noqa: BLE001 - the point: only InputError may come out
        pytest.fail(f"{what}: {type(e).__name__}: {e}")
    pytest.fail(f"{what}: loaded")


def test_a_few_real_unet_tensors_name_the_first_missing_one(tiny_file, tmp_path):
    full = load_file(tiny_file)
    few = {k: v for k, v in full.items() if k.startswith(("model.diffusion_model.input_blocks.0.0.",
                                                           "model.diffusion_model.input_blocks.1."))}
    assert "model.diffusion_model.input_blocks.0.0.weight" in few and len(few) > 4
    assert refused(few, tmp_path / "few.safetensors", "few") == "UNet: checkpoint lacks conv_out.weight"


def test_one_unknown_unet_tensor_is_named(tmp_path):
    message = refused({"model.diffusion_model.foo": torch.zeros(2)}, tmp_path / "foo.safetensors", "foo")
    assert message.startswith("UNet: checkpoint lacks input_blocks.*")


# tensors the architecture is read from (widths, channels, vocabulary): damage there is the hardest
READ_FROM = ["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.weight",
             "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
             "model.diffusion_model.input_blocks.4.0.in_layers.2.weight",
             "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
             "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
             "first_stage_model.post_quant_conv.weight", "first_stage_model.encoder.down.0.block.0.conv1.weight",
             "first_stage_model.encoder.conv_in.weight",
             "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"]


def test_fuzz_single_file_every_damage_is_an_input_error(tiny_file, tmp_path):
    full = load_file(tiny_file)
    rng = random.Random(0)
    weights = sorted(k for k in full if "." in k and not k.endswith("position_ids"))   # not dropped by the loader
    cases = {f"without {k}": {n: v for n, v in full.items() if n != k} for k in rng.sample(weights, 20) + READ_FROM}
    for i, k in enumerate(READ_FROM):   # cut short, one way in turn: half the columns, half the rows, flattened
        t = full[k]
        cut = [t[:, :t.shape[1] // 2], t[:t.shape[0] // 2], t.flatten()][i % 3]
        cases[f"{k} cut to {tuple(cut.shape)}"] = {**full, k: cut.contiguous()}
    for keep in (1, 3, 40, 400, 900, len(full) - 1):
        cases[f"first {keep} keys only"] = {k: full[k] for k in sorted(full)[:keep]}
    path = tmp_path / "damaged.safetensors"
    for what, tensors in cases.items():
        message = refused(tensors, path, what)
        assert message and "\n" not in message, what


def copy_folder(tiny_folder, tmp_path):
    folder = tmp_path / "tiny-diffusers"
    shutil.copytree(tiny_folder, folder)
    return folder


@pytest.mark.parametrize("part", ["unet", "vae", "text_encoder"])
def test_folder_without_a_component_names_it(part, tiny_folder, tmp_path):
    folder = copy_folder(tiny_folder, tmp_path)
    shutil.rmtree(folder / part)
    with pytest.raises(InputError, match=rf"not a diffusers-layout checkpoint .*; {part}/ missing\)"):
        load(folder)


def test_folder_damage_is_an_input_error(tiny_folder, tmp_path):
    folder = copy_folder(tiny_folder, tmp_path)
    (folder / "text_encoder" / "model.safetensors").rename(folder / "text_encoder" / "weights.bak")
    with pytest.raises(InputError, match="text_encoder: no model.safetensors"):
        load(folder)
    (folder / "text_encoder" / "weights.bak").rename(folder / "text_encoder" / "model.safetensors")

    config = folder / "unet" / "config.json"
    good = config.read_text()
    config.write_text(good[:-20])
    with pytest.raises(InputError, match=r"unet/config.json: not valid JSON"):
        load(folder)
    config.write_text("[1, 2]")
    with pytest.raises(InputError, match=r"unet/config.json: not a JSON object"):
        load(folder)
    config.write_text(good)

    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    full = load_file(unet_file)
    for key in random.Random(1).sample(sorted(full), 6) + ["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"]:
        save_file({k: v for k, v in full.items() if k != key}, str(unet_file))
        with pytest.raises(InputError, match=r"^UNet: checkpoint lacks"):
            load(folder)


# ---- the device is checked before the file is blamed -------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_device_error(tiny_file):
    with pytest.raises(InputError, match="^device cuda: no CUDA device is available to this torch$"):
        load(tiny_file, "cuda")
    with pytest.raises(InputError, match="^device cuda:1: no CUDA device"):
        files.check_device("cuda:1")
    # below load: a failed device move is torch's error, not "not a readable .safetensors file"
    with pytest.raises(Exception) as caught:
        read_safetensors(tiny_file, "cuda", torch.float32)
    assert not isinstance(caught.value, InputError), caught.value


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_mps_without_mps_is_a_device_error(tiny_file):
    with pytest.raises(InputError, match="^device mps: no MPS device is available to this torch$"):
        load(tiny_file, "mps")


def test_devices_that_exist_pass_and_nonsense_is_named():
    files.check_device("cpu")
    files.check_device(torch.device("cpu"))
    with pytest.raises(InputError, match="^device gpu0: not a torch device"):
        files.check_device("gpu0")


# ---- a long prompt is our error alone --------------------------------------------------------

def test_long_prompt_error_comes_without_the_transformers_warning(capfd, caplog):
    logger = logging.getLogger("transformers")   # transformers' loggers do not propagate to the root
    logger.addHandler(caplog.handler)
    try:
        tokenizer = load_tokenizer()              # fresh: transformers warns once per tokenizer
        with caplog.at_level(logging.DEBUG):
            with pytest.raises(InputError, match="prompt has 80 tokens, at most 75 fit"):
                check_prompts(tokenizer, ["cat " * 80])
            check_prompts(tokenizer, ["cat " * 75])   # exactly 77 with start and end
            with pytest.raises(InputError, match="prompt has 76 tokens"):
                check_prompts(tokenizer, ["cat " * 76])
    finally:
        logger.removeHandler(caplog.handler)
    out, err = capfd.readouterr()
    said = out + err + caplog.text
    assert "sequence length" not in said and "indexing errors" not in said, said


# ---- the fingerprint of the weights --------------------------------------------------------

def test_fingerprint_is_stable_and_filled_by_load(tiny, tiny_file, tiny_folder):
    file_print, folder_print = files.fingerprint(tiny_file), files.fingerprint(tiny_folder)
    assert len(file_print) == 16 and int(file_print, 16) >= 0
    assert files.fingerprint(tiny_file) == file_print
    assert files.fingerprint(str(tiny_folder)) == folder_print
    assert file_print != folder_print
    assert tiny.fingerprint == file_print and load(tiny_folder).fingerprint == folder_print


def test_fingerprint_tells_apart_other_weights_with_identical_headers(tiny_file, tiny_folder, tmp_path):
    make_tiny.main([str(tmp_path / "seed1"), "--seed", "1"])
    other_file, other_folder = tmp_path / "seed1" / "tiny.safetensors", tmp_path / "seed1" / "tiny-diffusers"
    assert files.safetensors_header(other_file) == files.safetensors_header(tiny_file)
    assert files.fingerprint(other_file) != files.fingerprint(tiny_file)
    assert files.fingerprint(other_folder) != files.fingerprint(tiny_folder)
    # a folder of the same name and layout: only the weights differ
    copy = copy_folder(tiny_folder, tmp_path / "copy")
    assert files.fingerprint(copy) == files.fingerprint(tiny_folder)
    shutil.copy(other_folder / "vae" / "diffusion_pytorch_model.safetensors", copy / "vae")
    assert files.fingerprint(copy) != files.fingerprint(tiny_folder)


def test_fingerprint_reads_a_bounded_number_of_bytes(tmp_path, monkeypatch):
    big = tmp_path / "big.safetensors"   # 200 MB of float32, sparse on disk
    header = json.dumps({"w": {"dtype": "F32", "shape": [50_000_000], "data_offsets": [0, 200_000_000]}}).encode()
    with open(big, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 200_000_000)
    read = []

    class Counting:
        def __init__(self, f):
            self.f = f
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.f.close()
        def read(self, n=-1):
            data = self.f.read(n)
            read.append(len(data))
            return data
        def seek(self, offset):
            return self.f.seek(offset)

    monkeypatch.setattr(files, "open", lambda path, mode: Counting(open(path, mode)), raising=False)
    files.fingerprint(big)
    assert sum(read) == 8 + len(header) + 16 * 4096   # the header, then 16 samples of 4 KiB


def test_fingerprint_refuses_what_load_refuses(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        files.fingerprint(tmp_path / "nope.safetensors")
    torch.save({"w": torch.zeros(1)}, tmp_path / "zip.safetensors")
    with pytest.raises(InputError, match="never unpickles"):
        files.fingerprint(tmp_path / "zip.safetensors")
    (tmp_path / "folder" / "unet").mkdir(parents=True)
    with pytest.raises(InputError, match="vae/, text_encoder/ missing"):
        files.fingerprint(tmp_path / "folder")


# ---- malformed safetensors headers: one InputError, before anything is read ----------------

def with_header(src, dst, change, key: str):
    """Copy the .safetensors file `src` to `dst` with its JSON header put through `change(header,
    key)`, which gives the new header as a dict or as raw bytes; the data stays as it was."""
    data = src.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = change(json.loads(data[8:8 + n]), key)
    header = header if isinstance(header, bytes) else json.dumps(header).encode()
    dst.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + n:])


def edit(header: dict, key: str, **fields) -> dict:
    return {**header, key: {**header[key], **fields}}


def renamed(header: dict, key: str, new: bytes) -> bytes:
    """The header as bytes with `key` renamed to `new`, bytes JSON cannot hold or escapes it decodes oddly."""
    text = json.dumps(header).encode()
    assert text.count(f'"{key}"'.encode()) == 1
    return text.replace(f'"{key}"'.encode(), b'"' + new + b'"')


# each case: (the change, what the one-line message says, with {key} the damaged tensor)
HEADERS = {
    "not JSON": (lambda h, k: b"{not json" + b" " * 8, "its header is not JSON: Expecting property name"),
    "an entry that is not an object": (lambda h, k: {**h, k: 5}, "tensor {key} is 5, not an object with dtype"),
    "an entry without a shape": (lambda h, k: {**h, k: {f: v for f, v in h[k].items() if f != "shape"}},
                                 "tensor {key} has no shape"),
    "a negative shape": (lambda h, k: edit(h, k, shape=[-1, 4, 3, 3]),
                         "tensor {key} has shape [-1, 4, 3, 3], not a list of sizes"),
    "a shape of text": (lambda h, k: edit(h, k, shape="32x4"), 'tensor {key} has shape "32x4"'),
    "a non-UTF-8 key": (lambda h, k: renamed(h, k, k.encode()[:-6] + b"\xff\xfeight"),
                        "its header is not UTF-8 text: byte 0xff"),
    "a lone surrogate key": (lambda h, k: renamed(h, k, k.encode()[:-6] + b"\\ud800ight"),
                             '.\\ud800ight", is not printable text'),
    "a newline in a key": (lambda h, k: renamed(h, k, k.encode() + b"\\n"), "is not printable text"),
    "an unknown dtype": (lambda h, k: edit(h, k, dtype="F33"), 'tensor {key} has dtype "F33"; p2p reads F64, F32'),
    "a dtype that is not text": (lambda h, k: edit(h, k, dtype=["F32"]), 'tensor {key} has dtype ["F32"]'),
    "data offsets beyond the file": (lambda h, k: edit(h, k, data_offsets=[h[k]["data_offsets"][0], 10 ** 12]),
                                     "tensor {key} ends at byte 1000000000000 of the data, but the file holds"),
    "offsets that do not fit the shape": (lambda h, k: edit(h, k, shape=[64, 4, 3, 3]),
                                          "tensor {key}: shape [64, 4, 3, 3] of F32 is 9216 bytes, its "
                                          "data_offsets span 4608"),
    "overlapping tensors": (lambda h, k: edit(h, k, data_offsets=[o - 4 for o in h[k]["data_offsets"]]),
                            "tensor {key} starts at byte"),
    "metadata that is not text": (lambda h, k: {**h, "__metadata__": {"format": 1}},
                                  '__metadata__ {"format": 1} is not a map of text to text'),
}
FILE_KEY, FOLDER_KEY = "model.diffusion_model.input_blocks.0.0.weight", "conv_in.weight"   # 32x4x3x3 F32 in both


def one_line_refusal(call, words: str) -> str:
    """`call()` must raise an InputError: one line that says `words`; anything else fails."""
    try:
        call()
    except InputError as e:
        message = str(e)
        assert "\n" not in message and words in message, message
        return message
    except Exception as e:   # noqa: BLE001 - the point: only InputError may come out
        pytest.fail(f"{type(e).__name__}: {e}")
    pytest.fail("accepted")


@pytest.mark.parametrize("case", HEADERS)
def test_malformed_header_of_a_single_file_is_one_line_before_any_read(case, tiny_file, tmp_path, monkeypatch):
    change, words = HEADERS[case]
    bad = tmp_path / "bad.safetensors"
    with_header(tiny_file, bad, change, FILE_KEY)
    words = words.replace("{key}", FILE_KEY)
    one_line_refusal(lambda: load(bad, "meta"), words)
    one_line_refusal(lambda: files.fingerprint(bad), words)
    one_line_refusal(lambda: prediction_of(bad), words)

    def opened(*args, **kwargs):
        raise AssertionError("the data was opened before the header was checked")
    monkeypatch.setattr(files, "safe_open", opened)   # the full read refuses on the header alone
    message = one_line_refusal(lambda: load(bad), words)
    assert message.startswith(f"{bad}: not a readable .safetensors file (")
    one_line_refusal(lambda: read_safetensors(bad, "cpu", torch.float32), words)


@pytest.mark.parametrize("case", HEADERS)
def test_malformed_header_in_a_folder_is_one_line(case, tiny_folder, tmp_path):
    change, words = HEADERS[case]
    folder = copy_folder(tiny_folder, tmp_path)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    with_header(tiny_folder / "unet" / unet.name, unet, change, FOLDER_KEY)
    words = words.replace("{key}", FOLDER_KEY)
    for call in (lambda: load(folder), lambda: load(folder, "meta"), lambda: files.fingerprint(folder)):
        assert one_line_refusal(call, words).startswith(f"{unet}: not a readable .safetensors file (")


def test_a_valid_header_passes_the_checks_unchanged(tiny_file):
    """The check reads what safetensors reads: every tensor, its dtype and shape."""
    table = files.tensor_table(tiny_file)
    full = load_file(tiny_file)
    assert table == {k: (v.dtype, tuple(v.shape)) for k, v in full.items()}


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_tensor_for_a_float_weight_is_refused_by_name(dtype, tiny_file, tiny_folder, tmp_path):
    full = load_file(tiny_file)
    full[FILE_KEY] = full[FILE_KEY].to(dtype)
    bad = tmp_path / "int.safetensors"
    save_file(full, str(bad))
    words = f"UNet: conv_in.weight holds {str(dtype).removeprefix('torch.')} values, expected floating-point weights"
    one_line_refusal(lambda: load(bad, "meta"), words)
    one_line_refusal(lambda: load(bad), words)
    folder = copy_folder(tiny_folder, tmp_path)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(unet)
    weights[FOLDER_KEY] = weights[FOLDER_KEY].to(dtype)
    save_file(weights, str(unet))
    one_line_refusal(lambda: load(folder), words)


# ---- symlink loops and a folder's configs --------------------------------------------------

def loop_at(path):
    """Put a symlink to itself at `path` (ln -s NAME NAME), in place of what was there."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    path.symlink_to(path.name)
    return path


def test_weights_that_are_a_symlink_loop_are_one_line(tmp_path):
    loop = loop_at(tmp_path / "loop")
    for call in (lambda: load(loop), lambda: load(loop, "meta"), lambda: files.fingerprint(loop),
                 lambda: prediction_of(loop)):
        assert one_line_refusal(call, f"{loop}: cannot read it (").endswith("symbolic links)")


@pytest.mark.parametrize("inside", ["unet", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                                    "tokenizer/vocab.json", "scheduler/scheduler_config.json"])
def test_a_symlink_loop_inside_a_folder_is_named(inside, tiny_folder, tmp_path):
    folder = copy_folder(tiny_folder, tmp_path)
    (folder / inside).parent.mkdir(exist_ok=True)
    loop = loop_at(folder / inside)
    calls = [lambda: load(folder), lambda: load(folder, "meta")]
    if not inside.startswith(("tokenizer", "scheduler")):   # what the fingerprint reads
        calls.append(lambda: files.fingerprint(folder))
    for call in calls:
        one_line_refusal(call, f"{loop}: cannot read it (")


# each case: (the component, what its config.json gets, what the one-line message says)
CONFIGS = {
    "norm_num_groups as text": ("unet", {"norm_num_groups": "32"}, 'norm_num_groups "32" is not a whole number >= 1'),
    "no GroupNorm groups": ("vae", {"norm_num_groups": 0}, "norm_num_groups 0 is not a whole number >= 1"),
    "heads true": ("unet", {"attention_head_dim": True}, "UNet: True is not a number of attention heads"),
    "heads [true] * 4": ("unet", {"attention_head_dim": [True] * 4}, "config gives the head counts [True, True"),
    "scaling_factor 0": ("vae", {"scaling_factor": 0}, "scaling_factor 0 is not a number > 0"),
    "scaling_factor as text": ("vae", {"scaling_factor": "0.18"}, 'scaling_factor "0.18" is not a number > 0'),
    "hidden_size as text": ("text_encoder", {"hidden_size": "x"}, 'hidden_size "x" is not a whole number >= 1'),
    "vocab_size null": ("text_encoder", {"vocab_size": None}, "vocab_size null is not a whole number >= 1"),
    "heads that do not split the width": ("text_encoder", {"num_attention_heads": 3},
                                          "hidden_size 128 does not split into 3 attention heads"),
    "no heads": ("text_encoder", {"num_attention_heads": 0}, "num_attention_heads 0 is not a whole number >= 1"),
    "an unknown activation": ("text_encoder", {"hidden_act": "nope"}, 'hidden_act "nope" is not an activation'),
    "layer_norm_eps as text": ("text_encoder", {"layer_norm_eps": "x"}, 'layer_norm_eps "x" is not a number > 0'),
}


def damaged_config(folder, part: str, change: dict | bytes):
    config = folder / part / "config.json"
    if not isinstance(change, bytes):
        change = json.dumps({**json.loads(config.read_text()), **change}).encode()
    config.write_bytes(change)
    return config


@pytest.mark.parametrize("case", CONFIGS)
def test_config_values_of_the_wrong_kind_are_one_line(case, tiny_folder, tmp_path):
    part, change, words = CONFIGS[case]
    folder = copy_folder(tiny_folder, tmp_path)
    config = damaged_config(folder, part, change)
    for call in (lambda: load(folder, "meta"), lambda: load(folder)):
        message = one_line_refusal(call, words)
        assert message.startswith(f"{config}: ") or message.startswith("UNet: ")


def test_config_files_that_cannot_be_read_are_one_line(tiny_folder, tmp_path):
    folder = copy_folder(tiny_folder, tmp_path)
    config = damaged_config(folder, "text_encoder", b'{"hidden_size": "\xff"}')
    one_line_refusal(lambda: load(folder), f"{config}: not valid JSON ('utf-8' codec can't decode byte 0xff")
    config.unlink()
    config.mkdir()
    one_line_refusal(lambda: load(folder), f"{config}: cannot read it (Is a directory)")
    one_line_refusal(lambda: files.fingerprint(folder), f"{config}: cannot read it (Is a directory)")


# ---- the same through the CLI: exit 2, one line on stderr ----------------------------------

def malformed(case: str, tiny_file, tiny_folder, tmp_path):
    """A broken checkpoint for `case` (one of HEADERS, CONFIGS or the cases below) and what its error says."""
    if case in HEADERS:
        change, words = HEADERS[case]
        with_header(tiny_file, tmp_path / "bad.safetensors", change, FILE_KEY)
        return tmp_path / "bad.safetensors", words.replace("{key}", FILE_KEY)
    folder = copy_folder(tiny_folder, tmp_path)
    if case in CONFIGS:
        part, change, words = CONFIGS[case]
        damaged_config(folder, part, change)
        return folder, words
    if case == "an integer weight":
        full = load_file(tiny_file)
        save_file({**full, FILE_KEY: full[FILE_KEY].long()}, str(tmp_path / "int.safetensors"))
        return tmp_path / "int.safetensors", "UNet: conv_in.weight holds int64 values, expected floating-point weights"
    if case == "a symlink loop":
        return loop_at(tmp_path / "loop"), "cannot read it (Too many levels of symbolic links)"
    assert case == "a folder whose unet/ is a symlink loop"
    return folder, f"{loop_at(folder / 'unet')}: cannot read it ("


@pytest.mark.parametrize("case", [*HEADERS, *CONFIGS, "an integer weight", "a symlink loop",
                                  "a folder whose unet/ is a symlink loop"])
def test_cli_refuses_a_malformed_checkpoint_in_one_line(case, tiny_file, tiny_folder, tmp_path, capsys):
    weights, words = malformed(case, tiny_file, tiny_folder, tmp_path)
    out = tmp_path / "g.png"
    for argv in (["sites", "--weights", weights],
                 ["generate", "--weights", weights, "--prompt", "a cat", "--steps", "1", "--height", "64",
                  "--width", "64", "--out", out]):
        code = main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"p2p {argv[0]}: error: ") and words in err, err
    assert not out.exists()


def test_a_file_cut_short_is_named(tiny_file, tmp_path, capsys):
    """An interrupted download: the header whole, the data not. Refused from the file's size alone,
    by the header-only read (p2p sites) as by the full one."""
    data = tiny_file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:len(data) - 1000])
    words = "of the data, but the file holds"
    for call in (lambda: load(cut, "meta"), lambda: load(cut), lambda: files.fingerprint(cut)):
        assert one_line_refusal(call, words).endswith("cut short?)")
    assert main(["sites", "--weights", str(cut)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"p2p sites: error: {cut}: not a readable .safetensors file (tensor ") and words in err
    assert len(err.strip().splitlines()) == 1, err
