"""`p2p download`: fetch the few safetensors and config files of a diffusers-layout SD v1 or 2.x repository
(or of one transformers model, as the metrics' CLIP and DINO)."""

import contextlib
import logging
import os
from pathlib import Path

from models import InputError
from models.files import FOLDER   # each component's weight file name

# The networks we load, and the stem of their weight file in the diffusers layout.
# Small side files, taken when the repository has them (models/ also bundles the CLIP tokenizer; the
# scheduler config says what the UNet predicts, the tokenizer's special tokens what SD 2 pads with).
EXTRAS = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
]
PROBE_TIMEOUT = 10  # seconds for the one request that checks the hub answers at all
TRUE_VALUES = ("1", "ON", "YES", "TRUE")  # how huggingface_hub reads a boolean variable
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")  # the ones huggingface_hub honours
# huggingface_hub logs every retry as a warning (5 of them, about 23 s, when offline); the HTTP
# clients (httpx, or urllib3 under requests in older versions) log their own.
NOISY_LOGGERS = ("huggingface_hub", "httpx", "httpx2", "httpcore", "urllib3")
LOCAL_WEIGHTS = "--weights PATH (a .safetensors file or a diffusers folder)"


def _weight(component: str, names: set[str], fp16: bool) -> str:
    """The one safetensors weight file of a component: the plain one, or the fp16 one if asked for."""
    plain = f"{component}/{FOLDER[component]}.safetensors"
    half = f"{component}/{FOLDER[component]}.fp16.safetensors"
    for name in [half, plain] if fp16 else [plain, half]:
        if name in names:
            return name
    raise InputError(f"the repository has no safetensors weights for {component}: "
                     "only safetensors are downloaded, because pickles (.bin, .ckpt) are never loaded")


# A single transformers model (the CLIP and DINO of the metrics): its config, weights and side files.
MODEL_FILES = ["config.json", "preprocessor_config.json", "vocab.json", "merges.txt", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json"]


def select_files(names: list[str], fp16: bool = False) -> list[str]:
    """The files to download from a repository listing `names`, sorted; never pickles or other
    frameworks. A diffusers-layout SD repository gives its three networks; a repository of one
    transformers model (config.json and model.safetensors at the top) gives that model."""
    names = set(names)
    if "config.json" in names and "unet/config.json" not in names:
        if "model.safetensors" not in names:
            raise InputError("the repository has no model.safetensors: only safetensors are downloaded, "
                             "because pickles (.bin, .ckpt) are never loaded")
        return sorted([name for name in MODEL_FILES if name in names] + ["model.safetensors"])
    picked = [name for name in EXTRAS if name in names]
    for component in FOLDER:
        if f"{component}/config.json" not in names:
            raise InputError(f"the repository has no {component}/config.json: "
                             "it is not a diffusers-layout Stable Diffusion repository")
        picked += [f"{component}/config.json", _weight(component, names, fp16)]
    return sorted(picked)


def _failure(repo: str, revision: str | None, action: str, error: Exception) -> InputError:
    """One line telling the user why talking to the model hub failed."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    login = "run `hf auth login` (older huggingface_hub: `huggingface-cli login`)"
    if isinstance(error, GatedRepoError):
        return InputError(f"{repo} is gated: accept its licence on the model page, then {login}")
    if isinstance(error, RepositoryNotFoundError):
        return InputError(f"repository {repo} not found (if it is private or gated, {login})")
    if isinstance(error, RevisionNotFoundError):
        return InputError(f"revision {revision} not found in {repo}")
    return InputError(f"{action} failed for {repo}: {_first_line(error)}")


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _check_online() -> None:
    """Refuse at once when the hub is switched off or does not answer. One request of our own: the
    client's calls retry 5 times over about 23 s, and HfApi has no way to ask for fewer."""
    from huggingface_hub import constants, get_session

    # Read now: huggingface_hub reads these once, when it is imported.
    offline = [name for name in OFFLINE_VARIABLES if os.environ.get(name, "").upper() in TRUE_VALUES]
    if offline or constants.HF_HUB_OFFLINE:
        name = (offline or ["HF_HUB_OFFLINE"])[0]
        raise InputError(f"the model hub is offline ({name} is set): pass local weights with {LOCAL_WEIGHTS}")
    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT)  # any answer, even an error status, will do
    except Exception as error:
        raise InputError(f"cannot reach the model hub ({constants.ENDPOINT}: {_first_line(error)}): "
                         f"download the weights elsewhere and pass them with {LOCAL_WEIGHTS}") from error


@contextlib.contextmanager
def _quiet():
    """Errors only from the hub client and the HTTP clients while inside; the user gets our one line."""
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def download(repo: str, directory: Path, fp16: bool = False, revision: str | None = None) -> Path:
    """Download the selected files of `repo` into directory/<owner>--<name>; returns that folder."""
    from huggingface_hub import HfApi, hf_hub_download

    folder = Path(directory) / repo.replace("/", "--")
    with _quiet():
        _check_online()
        # Any exception: the client's network errors share no base class we could name across
        # huggingface_hub versions (requests, then httpx), and the user needs one line either way.
        try:
            names = HfApi().list_repo_files(repo, revision=revision)
        except Exception as error:
            raise _failure(repo, revision, "listing files", error) from error
        for name in select_files(names, fp16):
            try:
                hf_hub_download(repo, name, revision=revision, local_dir=folder)
            except Exception as error:
                raise _failure(repo, revision, f"downloading {name}", error) from error
    return folder
