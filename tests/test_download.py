"""File selection for `p2p download`, on a hand-written repository listing (offline)."""

import pytest

from models import InputError
from p2p.download import select_files

# CompVis/stable-diffusion-v1-4 as its main branch lists it (written by hand), plus the kinds of
# files other SD repositories and branches carry: single-file checkpoints, onnx and flax weights.
LISTING = [
    ".gitattributes",
    "README.md",
    "model_index.json",
    "v1-variants-scores.jpg",
    "sd-v1-4.ckpt",
    "sd-v1-4.safetensors",
    "sd-v1-4-full-ema.ckpt",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json",
    "safety_checker/flax_model.msgpack",
    "safety_checker/model.fp16.safetensors",
    "safety_checker/model.safetensors",
    "safety_checker/pytorch_model.bin",
    "safety_checker/pytorch_model.fp16.bin",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/flax_model.msgpack",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/model.onnx",
    "text_encoder/model.safetensors",
    "text_encoder/pytorch_model.bin",
    "text_encoder/pytorch_model.fp16.bin",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_flax_model.msgpack",
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.bin",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/model.onnx",
    "unet/weights.pb",
    "vae/config.json",
    "vae/diffusion_flax_model.msgpack",
    "vae/diffusion_pytorch_model.bin",
    "vae/diffusion_pytorch_model.fp16.bin",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "vae_decoder/model.onnx",
    "vae_encoder/model.onnx",
]

COMMON = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "vae/config.json",
]


def test_select_full_precision():
    assert select_files(LISTING) == sorted(COMMON + [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ])


def test_select_fp16():
    assert select_files(LISTING, fp16=True) == sorted(COMMON + [
        "text_encoder/model.fp16.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ])


def test_fp16_falls_back_to_the_plain_file_and_back():
    only_plain = [n for n in LISTING if n != "vae/diffusion_pytorch_model.fp16.safetensors"]
    assert "vae/diffusion_pytorch_model.safetensors" in select_files(only_plain, fp16=True)
    only_half = [n for n in LISTING if n != "unet/diffusion_pytorch_model.safetensors"]
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in select_files(only_half)


def test_never_pickles_or_other_frameworks():
    for fp16 in (False, True):
        for name in select_files(LISTING, fp16):
            assert name.endswith((".json", ".txt", ".safetensors")), name
            assert name.split("/")[0] not in ("safety_checker", "feature_extractor"), name
            assert "/" in name or name == "model_index.json", name


def test_component_with_only_pickles_is_refused():
    pickles_only = [n for n in LISTING if not n.startswith("unet/") or not n.endswith(".safetensors")]
    for fp16 in (False, True):
        with pytest.raises(InputError, match=r"no safetensors weights for unet: .*pickles .* never loaded"):
            select_files(pickles_only, fp16)


def test_missing_component_is_refused():
    no_vae = [n for n in LISTING if not n.startswith("vae/")]
    with pytest.raises(InputError, match="vae/config.json"):
        select_files(no_vae)


def test_side_files_are_optional():
    minimal = [n for n in LISTING if n.split("/")[0] in ("unet", "vae", "text_encoder")]
    assert select_files(minimal) == [
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]


def _fake_hub(monkeypatch, listing_error=None):
    """Replace the two hub calls `download` makes; returns the list of downloads it asked for."""
    import huggingface_hub

    calls = []

    def list_repo_files(self, repo, revision=None):
        if listing_error is not None:
            raise listing_error
        calls.append(("list", repo, revision))
        return LISTING

    def hf_hub_download(repo, filename, revision=None, local_dir=None):
        calls.append((repo, filename, revision, local_dir))
        return str(local_dir / filename)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return calls


def test_download_fetches_the_selection_into_a_repo_folder(monkeypatch, tmp_path):
    from p2p.download import download

    calls = _fake_hub(monkeypatch)
    folder = download("CompVis/stable-diffusion-v1-4", tmp_path, fp16=True, revision="abc")
    assert folder == tmp_path / "CompVis--stable-diffusion-v1-4"
    assert calls[0] == ("list", "CompVis/stable-diffusion-v1-4", "abc")
    assert calls[1:] == [("CompVis/stable-diffusion-v1-4", name, "abc", folder)
                         for name in select_files(LISTING, fp16=True)]


def test_download_errors_become_one_line_input_errors(monkeypatch, tmp_path):
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    from p2p.download import download

    # Built without __init__, which wants an HTTP response object.
    cases = [
        (GatedRepoError.__new__(GatedRepoError, "403"), "gated: accept its licence"),
        (RepositoryNotFoundError.__new__(RepositoryNotFoundError, "404"), "repository x/y not found"),
        (ConnectionError("Name or service not known\nmore detail"), "listing files failed for x/y: Name or service not known$"),
    ]
    for error, message in cases:
        _fake_hub(monkeypatch, listing_error=error)
        with pytest.raises(InputError, match=message) as caught:
            download("x/y", tmp_path)
        assert "\n" not in str(caught.value)
