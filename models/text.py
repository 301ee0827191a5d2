"""The text encoder, through `transformers`, and its BPE tokenizer: CLIP ViT-L/14 for SD v1;
for SD 2 the text tower of OpenCLIP ViT-H/14, which is a CLIPTextModel too (exact GELU, read at
its penultimate block: 23 of its 24 layers, then the final LayerNorm) over the same vocabulary."""
import functools
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from . import InputError

MAX_TOKENS = 77            # CLIP's context length: start token, up to 75 words' tokens, end token
TOKENIZER_DIR = Path(__file__).parent / "tokenizer"   # vocab.json and merges.txt we ship


def text_config(vocab: int = 49408, width: int = 768, layers: int = 12, mlp: int = 3072,
                act: str = "quick_gelu") -> CLIPTextConfig:
    """CLIP text config; SD v1 defaults (SD 2: width 1024, 23 layers, mlp 4096, act "gelu").
    Heads are width / 64 in every CLIP text model."""
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=width // 64, max_position_embeddings=MAX_TOKENS, hidden_act=act,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def module_names(state: dict, model: CLIPTextModel) -> dict:
    """Checkpoint names (always `text_model.*`) -> the installed transformers' names
    (transformers 5 dropped the `text_model` level from CLIPTextModel)."""
    if any(k.startswith("text_model.") for k in model.state_dict()):
        return state
    return {k.removeprefix("text_model."): v for k, v in state.items()}


def embeddings(model: CLIPTextModel):
    return getattr(model, "text_model", model).embeddings


@functools.cache   # building it parses 1.7 MB of vocabulary (~30 ms); a sweep asks for it per cell
def load_tokenizer(directory: Path = TOKENIZER_DIR) -> CLIPTokenizer:
    """The BPE tokenizer of SD v1 and 2 (one per folder, shared). Its own padding is <|endoftext|>;
    TextEncoder pads with the model's pad token itself."""
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"),
                         pad_token="<|endoftext|>", model_max_length=MAX_TOKENS)


def check_prompts(tokenizer: CLIPTokenizer, prompts: list[str]):
    """A prompt that does not fit in 77 tokens is an error, never silently cut."""
    for prompt in prompts:
        # verbose=False: counting is not feeding the model, so no "longer than the maximum" warning
        n = len(tokenizer(prompt, verbose=False).input_ids)
        if n > MAX_TOKENS:
            raise InputError(f"prompt has {n - 2} tokens, at most {MAX_TOKENS - 2} fit: {prompt!r}")


class TextEncoder:
    """Prompts -> the text encoder's last hidden states [b, 77, width], the UNet's context."""

    def __init__(self, model: CLIPTextModel, tokenizer: CLIPTokenizer, pad: str = "<|endoftext|>"):
        self.model, self.tokenizer = model, tokenizer
        self.pad_id = tokenizer.convert_tokens_to_ids(pad)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids [b, 77]: start, the prompt's, end, then the pad token: <|endoftext|> for SD v1,
        "!" (id 0) for SD 2, as OpenCLIP pads. We pad here: a tokenizer given "!" as its pad token
        also reads every "!" of a prompt as padding (id 0, not the 256 SD 2 was trained with)."""
        check_prompts(self.tokenizer, prompts)
        ids = self.tokenizer(prompts).input_ids
        return torch.tensor([x + [self.pad_id] * (MAX_TOKENS - len(x)) for x in ids])

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenize(prompts).to(self.model.device)
        return self.model(input_ids=ids).last_hidden_state
