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


def selection(suffix: str = "") -> list[str]:
    """The side files and the three components' weights, full precision ("") or ".fp16"."""
    return sorted(COMMON + [f"text_encoder/model{suffix}.safetensors",
                            f"unet/diffusion_pytorch_model{suffix}.safetensors",
                            f"vae/diffusion_pytorch_model{suffix}.safetensors"])


def test_select_full_precision():
    assert select_files(LISTING) == selection()


def test_select_fp16():
    assert select_files(LISTING, fp16=True) == selection(".fp16")


# stabilityai/stable-diffusion-2-1-base as its main branch lists it (written by hand): no safety
# checker, and the LDM single files at the top beside the folders.
SD2_LISTING = [
    ".gitattributes",
    "README.md",
    "feature_extractor/preprocessor_config.json",
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder/pytorch_model.bin",
    "text_encoder/pytorch_model.fp16.bin",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "v2-1_512-ema-pruned.ckpt",
    "v2-1_512-ema-pruned.safetensors",
    "v2-1_512-nonema-pruned.ckpt",
    "v2-1_512-nonema-pruned.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.bin",
    "vae/diffusion_pytorch_model.fp16.bin",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
]


def test_select_sd2_takes_the_folders_and_the_scheduler_not_the_single_files():
    # The scheduler config says what the UNet predicts, the tokenizer's special tokens map that SD 2 pads with "!".
    for fp16, suffix in ((False, ""), (True, ".fp16")):
        assert select_files(SD2_LISTING, fp16) == selection(suffix)


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


def _fake_hub(monkeypatch, listing_error=None, probe_error=None):
    """Replace the hub calls `download` makes, online and with no offline variable set; returns
    the list of listings and downloads it asked for (the probe of the hub is not in it)."""
    import huggingface_hub

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    calls = []

    class Session:
        def head(self, url, timeout=None):
            assert url == huggingface_hub.constants.ENDPOINT and timeout is not None
            if probe_error is not None:
                raise probe_error

    monkeypatch.setattr(huggingface_hub, "get_session", Session)

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


LOCAL = "--weights PATH (a .safetensors file or a diffusers folder)"


def test_unreachable_hub_is_one_line_at_once(monkeypatch, tmp_path):
    from huggingface_hub import constants
    from p2p.download import download

    error = ConnectionError("[Errno -2] Name or service not known\nwhile requesting HEAD https://hub.invalid")
    calls = _fake_hub(monkeypatch, probe_error=error)
    with pytest.raises(InputError) as caught:
        download("x/y", tmp_path)
    assert str(caught.value) == (f"cannot reach the model hub ({constants.ENDPOINT}: [Errno -2] Name or service "
                                 f"not known): download the weights elsewhere and pass them with {LOCAL}")
    assert calls == []  # no listing, so none of its retries
    assert list(tmp_path.iterdir()) == []


def test_offline_variable_read_at_call_time(monkeypatch, tmp_path):
    import huggingface_hub
    from p2p.download import download

    for name, value in [("HF_HUB_OFFLINE", "1"), ("HF_HUB_OFFLINE", "true"), ("TRANSFORMERS_OFFLINE", "YES")]:
        calls = _fake_hub(monkeypatch, probe_error=AssertionError("the hub was probed"))
        monkeypatch.setenv(name, value)
        with pytest.raises(InputError) as caught:
            download("x/y", tmp_path)
        assert str(caught.value) == f"the model hub is offline ({name} is set): pass local weights with {LOCAL}"
        assert calls == []
    # Set when huggingface_hub was imported, gone from the environment since.
    _fake_hub(monkeypatch, probe_error=AssertionError("the hub was probed"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError, match=r"^the model hub is offline \(HF_HUB_OFFLINE is set\)"):
        download("x/y", tmp_path)
    _fake_hub(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert download("x/y", tmp_path) == tmp_path / "x--y"


def test_retry_warnings_are_silenced(monkeypatch, tmp_path, caplog):
    import logging

    import huggingface_hub
    from p2p.download import download

    _fake_hub(monkeypatch)
    levels = {name: logging.getLogger(name).level for name in ("huggingface_hub", "httpx2", "urllib3")}

    def flaky_listing(self, repo, revision=None):
        for attempt in range(1, 6):  # what huggingface_hub's http_backoff logs before giving up
            logging.getLogger("huggingface_hub.utils._http").warning(f"Retrying in 1s [Retry {attempt}/5].")
            logging.getLogger("urllib3.connectionpool").warning("Retrying (Retry(total=4)) after connection broken")
        raise ConnectionError("Read timed out.")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", flaky_listing)
    with pytest.raises(InputError) as caught:
        download("x/y", tmp_path)
    assert str(caught.value) == "listing files failed for x/y: Read timed out."
    assert [r.getMessage() for r in caplog.records] == []  # nothing reached a handler
    assert {name: logging.getLogger(name).level for name in levels} == levels


def test_a_single_transformers_model_gives_its_safetensors_and_side_files():
    listing = ["config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack",
               "vocab.json", "merges.txt", "preprocessor_config.json", "tokenizer.json", "README.md", ".gitattributes"]
    assert select_files(listing) == ["config.json", "merges.txt", "model.safetensors", "preprocessor_config.json",
                                     "tokenizer.json", "vocab.json"]
    with pytest.raises(InputError, match="no model.safetensors"):
        select_files(["config.json", "pytorch_model.bin", "preprocessor_config.json"])
