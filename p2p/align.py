"""Token alignment between a source prompt and an edited prompt (pure, no model).

Words are `prompt.split(" ")`, as in the official Prompt-to-Prompt code. Token
indices count in the 77-token sequence, where index 0 is <|startoftext|>, then the
prompt's tokens, then <|endoftext|> padding. m = 77 below.
"""
import torch

from models import InputError
from models.text import MAX_TOKENS, check_prompts


def word_tokens(tokenizer, prompt: str) -> list[list[int]]:
    """For each word of the prompt, the indices of its tokens (1-based: 0 is the start token).

    CLIP pre-tokenises on whitespace before BPE, so tokenising each word alone gives the
    whole prompt's tokens; a prompt where that fails (it should not happen) is an
    InputError rather than a silently wrong map. An empty word (two spaces) has no tokens.
    """
    check_prompts(tokenizer, [prompt])
    words, ids, start = [], [], 1
    for word in prompt.split(" "):
        word_ids = tokenizer(word).input_ids[1:-1]          # drop start and end tokens
        words.append(list(range(start, start + len(word_ids))))
        ids += word_ids
        start += len(word_ids)
    if ids != tokenizer(prompt).input_ids[1:-1]:
        raise InputError(f"cannot split the prompt into words token by token: {prompt!r}")
    return words


def token_indices(tokenizer, prompt: str, word: str | int) -> list[int]:
    """Token indices of every word equal to `word` (a string), or of word number `word` (an int)."""
    tokens = word_tokens(tokenizer, prompt)
    if isinstance(word, int):
        chosen = [tokens[word]] if 0 <= word < len(tokens) else []
    else:
        chosen = [t for w, t in zip(prompt.split(" "), tokens) if w == word]
    indices = [i for t in chosen for i in t]
    if not indices:
        words = ", ".join(repr(w) for w in prompt.split(" "))
        raise InputError(f"word {word!r} is not in the prompt {prompt!r} (words are split on spaces, "
                         f"punctuation stays attached: {words})")
    return indices


def replace_mapper(tokenizer, source: str, target: str, official: bool = False) -> torch.Tensor:
    """Word-swap token mapper M [m, m]: target column j = sum_i source column i * M[i, j].

    Words at the same position with the same number of tokens (unchanged or swapped) map
    token to token; a swapped word whose token count differs sends each of its source
    tokens to all of the target word's tokens with weight 1 / len(target tokens). The end
    token and padding continue one to one after the last word.

    Deliberate difference from the official code: after the last swapped word it sets
    M[j, j] instead of M[i, j], so when the swapped token counts differ every later token
    (end token and padding included) maps to the wrong source column. We keep M[i, j];
    when the target is shorter, its last padding columns, which have no source column
    left, take the source's last one (padding too), so every target column is fed.

    `official=True` is the authors' mapper, for exact reproduction of their images: from the
    first token after the last swapped word, M[j, j] = 1 for as long as both walks stay inside
    the 77 tokens, so a longer source word leaves the target's last columns unfed. The two
    differ only when a swapped word's token counts differ.
    """
    src, tgt = source.split(" "), target.split(" ")
    if len(src) != len(tgt):
        raise InputError(f"a word swap needs prompts with the same number of words, but the source "
                         f"has {len(src)} and the target {len(tgt)}: {source!r} -> {target!r}")
    mapper = torch.zeros(MAX_TOKENS, MAX_TOKENS)
    mapper[0, 0] = 1                                        # start token
    src_tokens, tgt_tokens = word_tokens(tokenizer, source), word_tokens(tokenizer, target)
    # words mapped word by word: all of them, or with official only up to the last swapped one
    last_swap = max((k for k, (a, b) in enumerate(zip(src, tgt)) if a != b), default=-1)
    tail = last_swap + 1 if official else len(src)
    for s, t in zip(src_tokens[:tail], tgt_tokens[:tail]):
        if len(s) == len(t):
            mapper[s, t] = 1                                # pairs s[k] -> t[k]
        elif not s or not t:
            raise InputError(f"a swapped word has no tokens (two spaces in a row?): {source!r} -> {target!r}")
        else:
            mapper[torch.tensor(s)[:, None], torch.tensor(t)] = 1 / len(t)
    # The rest (end token and padding; with official, every token after the last swap): i walks
    # the source, j the target, together to the end of the target.
    i, j = 1 + sum(map(len, src_tokens[:tail])), 1 + sum(map(len, tgt_tokens[:tail]))
    while j < MAX_TOKENS and (i < MAX_TOKENS or not official):
        if official:
            mapper[j, j] = 1                                # the authors' seq_aligner: M[j, j]
        else:
            mapper[min(i, MAX_TOKENS - 1), j] = 1
        i, j = i + 1, j + 1
    return mapper


def needleman_wunsch(x: list[int], y: list[int]) -> list[int]:
    """Global alignment of x (source) and y (target), scores gap 0, match 1, mismatch -1.

    Returns, for each target position j, the source position aligned to it or -1. Ties are
    broken as in the official code, because they decide the map: the traceback prefers
    left (target token unaligned), then up (source token dropped), then diagonal.
    """
    LEFT, UP, DIAG = 1, 2, 3
    score = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]   # borders: gap 0, so all 0
    move = [[LEFT] * (len(y) + 1) for _ in range(len(x) + 1)]  # first row: all left
    for i in range(1, len(x) + 1):
        move[i][0] = UP                                         # first column: all up
        for j in range(1, len(y) + 1):
            left, up = score[i][j - 1], score[i - 1][j]
            diag = score[i - 1][j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            score[i][j] = max(left, up, diag)
            move[i][j] = LEFT if score[i][j] == left else UP if score[i][j] == up else DIAG
    partner = [-1] * len(y)
    i, j = len(x), len(y)
    while i > 0 or j > 0:
        if move[i][j] == DIAG:
            i, j = i - 1, j - 1
            partner[j] = i
        elif move[i][j] == LEFT:
            j -= 1                                          # target token j keeps partner -1
        else:
            i -= 1                                          # source token i is dropped
    return partner


def refine_mapper(tokenizer, source: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Add-words mapper: target token j takes source column mapper[j] where alphas[j] is 1.

    The alignment covers start token, prompt tokens and end token; padding maps to itself
    (mapper[j] = j, alpha 1), as in the official code. A target token with no source
    partner gets alpha 0 and mapper 0, a valid index whose column is then ignored (the
    official code stores -1, which PyTorch would read as column 76).
    """
    check_prompts(tokenizer, [source, target])
    y = tokenizer(target).input_ids
    partner = torch.tensor(needleman_wunsch(tokenizer(source).input_ids, y))
    mapper = torch.arange(MAX_TOKENS)                   # padding: j -> j
    alphas = torch.ones(MAX_TOKENS)
    mapper[:len(y)] = partner.clamp(min=0)
    alphas[:len(y)] = (partner >= 0).float()
    return mapper, alphas
