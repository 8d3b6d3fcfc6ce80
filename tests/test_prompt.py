"""Prompt surgery: exact ids and masks on the real CLIP vocabulary, and every prompt error."""

import pytest

from photomaker.errors import PromptError
from photomaker.prompt import (
    add_trigger_token,
    expand_class_tokens,
    has_trigger_word,
    insert_trigger_word,
    pad_or_truncate,
    remove_trigger,
    strip_trigger_word,
)

BOS, EOS, TRIGGER = 49406, 49407, 49408
A, PHOTO, OF, MAN = 320, 1125, 539, 786


@pytest.fixture
def tokenizer(clip_tokenizer):
    assert add_trigger_token(clip_tokenizer) == TRIGGER
    return clip_tokenizer


@pytest.fixture
def tokenizer_2(clip_tokenizer_2):
    assert add_trigger_token(clip_tokenizer_2) == TRIGGER
    return clip_tokenizer_2


def ids_of(tokenizer, prompt):
    return tokenizer(prompt, truncation=False).input_ids


def expand(tokenizer, prompt, num_id_tokens, pad_id=EOS):
    return expand_class_tokens(
        ids_of(tokenizer, prompt),
        trigger_id=TRIGGER,
        num_id_tokens=num_id_tokens,
        eos_id=EOS,
        pad_id=pad_id,
        prompt=prompt,
        decode=tokenizer.decode,
    )


def test_trigger_is_one_special_token_matched_as_whole_word(tokenizer):
    assert ids_of(tokenizer, "a photo of a man img") == [BOS, A, PHOTO, OF, A, MAN, TRIGGER, EOS]
    assert TRIGGER not in ids_of(tokenizer, "a man imgs on imgur")
    assert TRIGGER not in ids_of(tokenizer, "a man Img")  # case-sensitive, like the reference


@pytest.mark.parametrize("num_id_tokens", [1, 2, 4, 8])
def test_class_word_repeated_once_per_id_token(tokenizer, num_id_tokens):
    out = expand(tokenizer, "a photo of a man img", num_id_tokens)
    expected = [BOS, A, PHOTO, OF, A] + [MAN] * num_id_tokens + [EOS]
    assert out.input_ids == expected + [EOS] * (77 - len(expected))
    assert [i for i, m in enumerate(out.class_tokens_mask) if m] == list(range(5, 5 + num_id_tokens))
    assert out.class_position == 5 and out.num_dropped_tokens == 0


def test_v1_uses_n_copies_and_v2_uses_2n(tokenizer):
    three_photos_v1 = expand(tokenizer, "a man img smiling", 3 * 1)
    three_photos_v2 = expand(tokenizer, "a man img smiling", 3 * 2)
    assert sum(three_photos_v1.class_tokens_mask) == 3
    assert sum(three_photos_v2.class_tokens_mask) == 6
    assert three_photos_v2.input_ids[:10] == [BOS, A] + [MAN] * 6 + [9200, EOS]


def test_second_tokenizer_pads_with_exclamation_mark(tokenizer_2):
    out = expand(tokenizer_2, "a man img", 2, pad_id=0)
    assert out.input_ids[:6] == [BOS, A, MAN, MAN, EOS, 0]
    assert set(out.input_ids[5:]) == {0}
    assert out.class_tokens_mask[2:4] == [True, True] and sum(out.class_tokens_mask) == 2


def test_no_trigger_says_which_word_to_add_after_which_class_word(tokenizer):
    with pytest.raises(PromptError, match=r"no trigger word 'img'.*after the class word 'woman'.*a woman img in"):
        expand(tokenizer, "a portrait of a woman in a garden", 1)


def test_no_trigger_and_no_class_word_gives_an_example(tokenizer):
    with pytest.raises(PromptError, match=r"no trigger word 'img'.*class word followed by 'img'"):
        expand(tokenizer, "a cat on a sofa", 1)


def test_two_triggers_refused(tokenizer):
    with pytest.raises(PromptError, match="'img' 2 times; use it exactly once"):
        expand(tokenizer, "a man img and a woman img", 1)


def test_trigger_without_class_word_refused(tokenizer):
    with pytest.raises(PromptError, match="must follow a class word"):
        expand(tokenizer, "img in a garden", 1)


def test_class_copies_that_do_not_fit_say_how_many_tokens_to_remove(tokenizer):
    prompt = "very " * 72 + "old man img"  # BOS + 73 tokens before 'man'
    ids = ids_of(tokenizer, prompt)
    class_at = ids.index(TRIGGER) - 1
    assert class_at == 74
    fits = expand(tokenizer, prompt, 2)  # copies at 74 and 75, EOS at 76
    assert fits.input_ids[74:] == [MAN, MAN, EOS] and fits.num_dropped_tokens == 0
    with pytest.raises(PromptError, match=r"'man'.*Remove at least 2 token\(s\) before"):
        expand(tokenizer, prompt, 4)  # copies 74..77, the last allowed position is 75


def test_long_prompt_loses_words_at_the_end_but_keeps_eos_and_class_copies(tokenizer):
    prompt = "a man img " + "smiling " * 100
    out = expand(tokenizer, prompt, 2)
    assert len(out.input_ids) == 77 and out.input_ids[-1] == EOS
    assert out.input_ids[:4] == [BOS, A, MAN, MAN]
    assert out.num_dropped_tokens == len(ids_of(tokenizer, prompt)) - 77  # -trigger +1 copy


def test_remove_trigger_and_pad():
    ids = [BOS, A, MAN, TRIGGER, EOS]
    assert remove_trigger(ids, TRIGGER) == [BOS, A, MAN, EOS]
    padded, dropped = pad_or_truncate([BOS, A, MAN, EOS], eos_id=EOS, pad_id=0, max_length=6)
    assert padded == [BOS, A, MAN, EOS, 0, 0] and dropped == 0
    cut, dropped = pad_or_truncate([BOS, A, A, A, MAN, EOS], eos_id=EOS, pad_id=0, max_length=4)
    assert cut == [BOS, A, A, EOS] and dropped == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("blurry img, bad", ("blurry, bad", True)),
        ("img blurry", ("blurry", True)),
        ("bad img", ("bad", True)),
        ("imgs, image, Img", ("imgs, image, Img", False)),  # other words, and case, as the tokenizer sees them
        ("", ("", False)),
    ],
)
def test_strip_trigger_word(text: str, expected: tuple[str, bool]) -> None:
    assert strip_trigger_word(text) == expected


def test_insert_trigger_after_first_class_word():
    assert insert_trigger_word("A Woman reading, a man watching") == (
        "A Woman img reading, a man watching",
        "Added the trigger word 'img' after the class word 'Woman': \"A Woman img reading, a man watching\"",
    )
    assert insert_trigger_word("a man img smiling") == ("a man img smiling", None)
    assert insert_trigger_word("a dog on a beach") == ("a dog on a beach", None)
    assert insert_trigger_word("a manly person", "sks")[0] == "a manly person sks"


def test_has_trigger_word_matches_whole_words_only():
    assert has_trigger_word("a man img, smiling")
    assert not has_trigger_word("a man on imgur")
    assert not has_trigger_word("a man Img")


def test_text_check_runs_before_any_model():
    from photomaker.prompt import check_prompt_text

    check_prompt_text("a man img smiling")
    with pytest.raises(PromptError, match="must follow a class word"):
        check_prompt_text("img smiling")
    with pytest.raises(PromptError, match="must follow a class word"):
        check_prompt_text(", img smiling")
    with pytest.raises(PromptError, match="'img' 2 times"):
        check_prompt_text("a man img and a woman img")
    with pytest.raises(PromptError, match="no trigger word 'img'.*'man'"):
        check_prompt_text("a man on imgur")
