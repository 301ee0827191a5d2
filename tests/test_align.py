"""Token alignment with the real CLIP tokenizer; every expected map is written out by hand
from the token ids (printed once, listed in the comments)."""
import pytest
import torch

from models import InputError
from models.text import load_tokenizer
from p2p.align import needleman_wunsch, refine_mapper, replace_mapper, token_indices, word_tokens

TOK = load_tokenizer()
CAT = "a cat riding a bicycle"             # <s> a cat riding a bicycle </s>: one token per word


# ---- words -> token indices -----------------------------------------------------------------

def test_word_tokens_one_token_per_word():
    assert word_tokens(TOK, CAT) == [[1], [2], [3], [4], [5]]


def test_word_tokens_multi_token_word():
    # "tiramisu" is three BPE tokens: ti, ram, isu</w> (ids 555, 1976, 23328)
    assert TOK.convert_ids_to_tokens(TOK("tiramisu").input_ids[1:-1]) == ["ti", "ram", "isu</w>"]
    assert word_tokens(TOK, "a squirrel eating a tiramisu") == [[1], [2], [3], [4], [5, 6, 7]]


def test_word_tokens_punctuation_belongs_to_its_word():
    # "bicycle," -> bicycle</w> ,</w>: both tokens are the word's, later words shift by one
    assert word_tokens(TOK, "a cat riding a bicycle, at night") == [[1], [2], [3], [4], [5, 6], [7], [8]]


def test_word_tokens_empty_word_has_no_tokens():
    assert word_tokens(TOK, "a  cat") == [[1], [], [2]]          # split(" ") gives "a", "", "cat"


@pytest.mark.parametrize("prompt, words", [
    # "c#t" is c, #, t (ids 322, 258, 339). The authors' get_word_inds counts the characters of each
    # decoded token with "#" stripped, so "#" counts 0: it gives "c#t" [2, 3, 4, 5], "riding" [6, 7],
    # and the last two words nothing.
    ("a c#t riding a bike", [[1], [2, 3, 4], [5], [6], [7]]),
    # "cafe" + a combining acute is one token, café (15304, as "caf\u00e9"): the tokenizer composes
    # it, so its decoded length is 4 and the word's 5; theirs gives "cafe\u0301" [2, 3], "on" [4, 5].
    ("a cafe\u0301 on a street", [[1], [2], [3], [4], [5]]),
    # three combining graves on x: x then six byte tokens, each decoded as one U+FFFD; theirs runs
    # past the last word and raises IndexError
    ("a x\u0300\u0300\u0300 y", [[1], [2, 3, 4, 5, 6, 7, 8], [9]]),
    # two spaces: split(" ") has an empty word of no tokens; theirs gives it "cat"'s token, and "a" [4, 5]
    ("a  cat riding a bike", [[1], [], [2], [3], [4], [5]]),
])
def test_word_tokens_are_each_words_own_tokens_where_the_authors_split_differs(prompt, words):
    """Each word's indices hold exactly the tokens it has alone (CLIP splits on whitespace before
    BPE), where the authors' character counting drifts; so --replace-mapper official, built on
    our split, differs from their exact mapper for such prompts."""
    assert word_tokens(TOK, prompt) == words
    ids = TOK(prompt).input_ids
    for word, indices in zip(prompt.split(" "), words):
        assert [ids[i] for i in indices] == TOK(word).input_ids[1:-1]


def test_token_indices_every_occurrence_and_by_number():
    assert token_indices(TOK, CAT, "a") == [1, 4]
    assert token_indices(TOK, CAT, 4) == [5]
    assert token_indices(TOK, "a squirrel eating a tiramisu", "tiramisu") == [5, 6, 7]


def test_token_indices_missing_word():
    with pytest.raises(InputError) as e:
        token_indices(TOK, CAT, "dog")
    assert str(e.value) == ("word 'dog' is not in the prompt 'a cat riding a bicycle' (words are split on "
                            "spaces, punctuation stays attached: 'a', 'cat', 'riding', 'a', 'bicycle')")
    with pytest.raises(InputError, match="word 5 is not in the prompt"):
        token_indices(TOK, CAT, 5)
    with pytest.raises(InputError):                  # words match exactly, as the official code does
        token_indices(TOK, "a cat riding a bicycle, at night", "bicycle")


def test_prompt_too_long():
    with pytest.raises(InputError, match="at most 75 fit"):
        word_tokens(TOK, "a " * 80)


# ---- replace (word swap) --------------------------------------------------------------------

def test_replace_same_token_count_is_identity():
    assert torch.equal(replace_mapper(TOK, CAT, "a car riding a bicycle"), torch.eye(77))


def test_replace_one_token_by_three_at_the_end():
    # source <s> a squirrel eating a burger </s>      : burger at 5, </s> at 6
    # target <s> a squirrel eating a ti ram isu </s>  : tiramisu at 5 6 7, </s> at 8
    m = replace_mapper(TOK, "a squirrel eating a burger", "a squirrel eating a tiramisu")
    expected = torch.zeros(77, 77)
    for i in range(5):
        expected[i, i] = 1                           # <s> a squirrel eating a
    expected[5, [5, 6, 7]] = 1 / 3                   # burger spread over ti, ram, isu
    for i in range(6, 75):
        expected[i, i + 2] = 1                       # </s> and padding shifted by two; 75, 76 unused
    assert torch.equal(m, expected)
    assert m.dtype == torch.float32
    assert m[6, 8] == 1 and m[8, 8] == 0             # official code: M[8, 8] (misaligned </s>)
    assert torch.allclose(m.sum(0), torch.tensor([1.0] * 5 + [1 / 3] * 3 + [1.0] * 69))
    assert m.sum(1).tolist() == [1.0] * 75 + [0.0, 0.0]


def test_replace_three_tokens_by_one_in_the_middle():
    # source <s> a ti ram isu on a table </s> : tiramisu 2 3 4, on 5, a 6, table 7, </s> 8
    # target <s> a burger on a table </s>     : burger 2, on 3, a 4, table 5, </s> 6
    m = replace_mapper(TOK, "a tiramisu on a table", "a burger on a table")
    expected = torch.zeros(77, 77)
    expected[0, 0] = expected[1, 1] = 1
    expected[[2, 3, 4], 2] = 1                       # ratio 1 / len(target tokens) = 1
    for i in range(5, 77):
        expected[i, i - 2] = 1                       # on a table </s> padding: i -> i - 2
    expected[76, [75, 76]] = 1                       # past the source's end: its last padding column
    assert torch.equal(m, expected)
    assert m[5, 3] == 1 and m[3, 3] == 0             # official code: M[3, 3] after the last swap
    assert m.sum(0).tolist() == [1.0, 1.0, 3.0] + [1.0] * 74


def test_official_mapper_one_token_by_three_in_the_middle():
    # source <s> a burger on a table </s>      : burger 2, on 3, a 4, table 5, </s> 6
    # target <s> a ti ram isu on a table </s>  : tiramisu 2 3 4, on 5, a 6, table 7, </s> 8
    # The authors' walk: i = j = 0, 1 one to one; the swap sends 2 -> 2, 3, 4 (1/3 each) and jumps
    # to i = 3, j = 5; after the last swap it sets M[j, j] while i, j < 77: j = 5..76 (i = 3..74).
    m = replace_mapper(TOK, "a burger on a table", "a tiramisu on a table", official=True)
    expected = torch.zeros(77, 77)
    expected[0, 0] = expected[1, 1] = 1
    expected[2, [2, 3, 4]] = 1 / 3
    for j in range(5, 77):
        expected[j, j] = 1                           # "on" (source 3) is read from source column 5
    assert torch.equal(m, expected)
    aligned = replace_mapper(TOK, "a burger on a table", "a tiramisu on a table")
    assert aligned[3, 5] == 1 and aligned[5, 5] == 0 and not torch.equal(aligned, m)


def test_official_mapper_three_tokens_by_one_leaves_the_last_columns_unfed():
    # source <s> a ti ram isu on a table </s>, target <s> a burger on a table </s>: after the swap
    # i = 5, j = 3; M[j, j] for j = 3..74 while i = 5..76 < 77; target columns 75, 76 get nothing.
    m = replace_mapper(TOK, "a tiramisu on a table", "a burger on a table", official=True)
    expected = torch.zeros(77, 77)
    expected[0, 0] = expected[1, 1] = 1
    expected[[2, 3, 4], 2] = 1
    for j in range(3, 75):
        expected[j, j] = 1
    assert torch.equal(m, expected)
    assert m[:, 75:].sum() == 0


def test_official_mapper_equals_ours_when_token_counts_agree():
    for target in ("a dog riding a bicycle", "a cat riding a car", "a dog riding a car"):
        assert torch.equal(replace_mapper(TOK, CAT, target, official=True), replace_mapper(TOK, CAT, target))
    assert torch.equal(replace_mapper(TOK, CAT, CAT, official=True), torch.eye(77))   # nothing swapped


def test_official_mapper_maps_one_to_one_between_swaps():
    # two swaps: the words between them are walked with i != j, one to one (M[i, j]); M[j, j] only
    # after the last one. source <s> a tiramisu and a cat </s>: tiramisu 2-4, and 5, a 6, cat 7
    # target <s> a burger and a dog </s>: burger 2, and 3, a 4, dog 5, </s> 6
    m = replace_mapper(TOK, "a tiramisu and a cat", "a burger and a dog", official=True)
    assert m[[2, 3, 4], 2].tolist() == [1, 1, 1]
    assert m[5, 3] == 1 and m[6, 4] == 1 and m[7, 5] == 1     # between and at the last swap: aligned
    assert m[6, 6] == 1 and m[8, 6] == 0                        # after it: M[j, j], so </s> reads column 6


def test_replace_needs_same_word_count():
    with pytest.raises(InputError, match="source has 5 and the target 6"):
        replace_mapper(TOK, CAT, "a cat riding a red bicycle")


# ---- refine (added words) -------------------------------------------------------------------

def test_refine_words_added_at_the_end():
    # source <s> a photo of a house on a mountain </s>          (10 tokens)
    # target <s> a photo of a house on a mountain at winter </s> (12 tokens)
    mapper, alphas = refine_mapper(TOK, "a photo of a house on a mountain",
                                   "a photo of a house on a mountain at winter")
    assert mapper[:15].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 9, 12, 13, 14]
    assert alphas[:15].tolist() == [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1]
    assert mapper[12:].tolist() == list(range(12, 77)) and alphas[12:].eq(1).all()
    assert mapper.dtype == torch.int64 and alphas.dtype == torch.float32


def test_refine_word_inserted_in_the_middle():
    # source <s> a painting of a squirrel eating a burger </s>            (10 tokens)
    # target <s> a realistic painting of a squirrel eating a burger </s>  (11 tokens)
    mapper, alphas = refine_mapper(TOK, "a painting of a squirrel eating a burger",
                                   "a realistic painting of a squirrel eating a burger")
    assert mapper[:15].tolist() == [0, 1, 0, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14]
    assert alphas[:15].tolist() == [1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    assert mapper[11:].tolist() == list(range(11, 77)) and alphas[11:].eq(1).all()


def test_alignment_tie_breaking_matches_the_official_traceback():
    # x=[1,2,3], y=[1,3]: diag (3,3), up over 2, diag (1,1)
    assert needleman_wunsch([1, 2, 3], [1, 3]) == [0, 2]
    # mismatches never pair (0 beats -1): both targets unaligned
    assert needleman_wunsch([1, 2], [3, 4]) == [-1, -1]
    # two equally good alignments; left-first picks y[0]=2 <-> x[1], y[1] unaligned
    # (up-first would give [-1, 0])
    assert needleman_wunsch([1, 2], [2, 1]) == [1, -1]
    # a repeated target token: at (1, 2) left ties diag, left wins, so the *first* copy pairs
    # (diag-first would give [-1, 0])
    assert needleman_wunsch([1], [1, 1]) == [0, -1]
    assert needleman_wunsch([], [5]) == [-1] and needleman_wunsch([5], []) == []
