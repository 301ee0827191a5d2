"""`p2p download`: fetch the few safetensors and config files of a diffusers-layout SD v1 repository."""

from pathlib import Path

from models import InputError

# The networks we load, and the stem of their weight file in the diffusers layout.
COMPONENTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
# Small side files, taken when the repository has them (models/ also bundles the CLIP tokenizer).
EXTRAS = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
]


def _weight(component: str, names: set[str], fp16: bool) -> str:
    """The one safetensors weight file of a component: the plain one, or the fp16 one if asked for."""
    plain = f"{component}/{COMPONENTS[component]}.safetensors"
    half = f"{component}/{COMPONENTS[component]}.fp16.safetensors"
    for name in [half, plain] if fp16 else [plain, half]:
        if name in names:
            return name
    raise InputError(f"the repository has no safetensors weights for {component}: "
                     "only safetensors are downloaded, because pickles (.bin, .ckpt) are never loaded")


def select_files(names: list[str], fp16: bool = False) -> list[str]:
    """The files to download from a repository listing `names`, sorted; never pickles or other frameworks."""
    names = set(names)
    picked = [name for name in EXTRAS if name in names]
    for component in COMPONENTS:
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
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return InputError(f"{action} failed for {repo}: {first_line}")


def download(repo: str, directory: Path, fp16: bool = False, revision: str | None = None) -> Path:
    """Download the selected files of `repo` into directory/<owner>--<name>; returns that folder."""
    from huggingface_hub import HfApi, hf_hub_download

    folder = Path(directory) / repo.replace("/", "--")
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
