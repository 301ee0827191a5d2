"""The CLIP ViT-L/14 text encoder of SD v1, through `transformers`, and its BPE tokenizer."""
import functools
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from . import InputError

MAX_TOKENS = 77            # CLIP's context length: start token, up to 75 words' tokens, end token
TOKENIZER_DIR = Path(__file__).parent / "tokenizer"   # vocab.json and merges.txt we ship


def text_config(vocab: int = 49408, width: int = 768, layers: int = 12, mlp: int = 3072) -> CLIPTextConfig:
    """CLIP text config; SD v1 defaults. Heads are width / 64 in every CLIP text model."""
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=width // 64, max_position_embeddings=MAX_TOKENS, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def module_names(sd: dict, model: CLIPTextModel) -> dict:
    """Checkpoint names (always `text_model.*`) -> the installed transformers' names
    (transformers 5 dropped the `text_model` level from CLIPTextModel)."""
    if any(k.startswith("text_model.") for k in model.state_dict()):
        return sd
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


def embeddings(model: CLIPTextModel):
    return getattr(model, "text_model", model).embeddings


@functools.cache   # building it parses 1.7 MB of vocabulary (~30 ms); a sweep asks for it per cell
def load_tokenizer(directory: Path = TOKENIZER_DIR) -> CLIPTokenizer:
    """Tokenizer that pads with <|endoftext|> to 77 tokens, as SD v1 was trained (one per folder, shared)."""
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
    """Prompts -> CLIP's last hidden states [b, 77, width], the UNet's context."""

    def __init__(self, model: CLIPTextModel, tokenizer: CLIPTokenizer):
        self.model, self.tokenizer = model, tokenizer

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids [b, 77], padded with <|endoftext|>."""
        check_prompts(self.tokenizer, prompts)
        return self.tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS,
                              return_tensors="pt").input_ids

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenize(prompts).to(self.model.device)
        return self.model(input_ids=ids).last_hidden_state
