"""Trigger-word and class-word surgery on token ids (pure functions, no model).

PhotoMaker marks the subject in a prompt with a class word followed by a trigger word, e.g.
``"a photo of a man img"``. The trigger is a special token added to both tokenizers; it never reaches a text
encoder. Instead the class token just before it is repeated once per ID token (N images x tokens per image)
and those copies are later replaced by the fused ID embeddings. Everything here works on plain lists of ids so
that it can be tested exactly, without any model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import PromptError

DEFAULT_TRIGGER_WORD = "img"
MAX_TOKENS = 77

# Words that name a subject class; used only to give helpful messages and to insert a missing trigger.
# Any single-token word may be used as a class word in the prompt itself.
CLASS_WORDS = (
    "man",
    "woman",
    "girl",
    "boy",
    "person",
    "lady",
    "guy",
    "gentleman",
    "child",
    "kid",
    "baby",
    "teenager",
    "men",
    "women",
    "people",
    "male",
    "female",
)
_CLASS_WORD_PATTERN = re.compile(r"\b(" + "|".join(CLASS_WORDS) + r")\b", re.IGNORECASE)


@dataclass(frozen=True)
class ExpandedPrompt:
    """A prompt's ids after surgery, padded to ``MAX_TOKENS``.

    ``class_tokens_mask[i]`` is True at the class-token copies that the ID embeddings replace.
    ``num_dropped_tokens`` counts tokens cut from the end (before EOS) because the prompt was too long.
    """

    input_ids: list[int]
    class_tokens_mask: list[bool]
    class_position: int
    num_dropped_tokens: int


def _example_fix(prompt: str | None, trigger_word: str) -> str:
    """A concrete suggestion: which word to put after which class word."""
    if prompt:
        match = _CLASS_WORD_PATTERN.search(prompt)
        if match:
            fixed = prompt[: match.end()] + f" {trigger_word}" + prompt[match.end() :]
            return f"add '{trigger_word}' right after the class word '{match.group(0)}': \"{fixed}\""
    return (
        f"describe the subject with a class word followed by '{trigger_word}', "
        f'e.g. "a photo of a man {trigger_word}" or "a woman {trigger_word} in a garden"'
    )


def find_trigger(
    token_ids: Sequence[int],
    trigger_id: int,
    *,
    trigger_word: str = DEFAULT_TRIGGER_WORD,
    prompt: str | None = None,
) -> int:
    """Index of the single trigger token; ``PromptError`` if there is none or more than one."""
    positions = [i for i, token in enumerate(token_ids) if token == trigger_id]
    if not positions:
        raise PromptError(
            f"The prompt has no trigger word '{trigger_word}', so the ID photos would be ignored: "
            + _example_fix(prompt, trigger_word)
            + "."
        )
    if len(positions) > 1:
        raise PromptError(
            f"The prompt has the trigger word '{trigger_word}' {len(positions)} times; use it exactly once, "
            f'right after the class word of the one subject (e.g. "a man {trigger_word}").'
        )
    return positions[0]


def remove_trigger(token_ids: Sequence[int], trigger_id: int) -> list[int]:
    """The ids with every trigger token removed: the text-only prompt."""
    return [token for token in token_ids if token != trigger_id]


def pad_or_truncate(
    token_ids: Sequence[int], *, eos_id: int, pad_id: int, max_length: int = MAX_TOKENS
) -> tuple[list[int], int]:
    """Fit ids (BOS ... EOS) into ``max_length``: cut before EOS, keep EOS, then pad.

    Returns the ids and the number of tokens cut, so callers can tell the user what was dropped.
    """
    ids = list(token_ids)
    dropped = 0
    if len(ids) > max_length:
        dropped = len(ids) - max_length
        ids = ids[: max_length - 1] + [eos_id]
    return ids + [pad_id] * (max_length - len(ids)), dropped


def expand_class_tokens(
    token_ids: Sequence[int],
    *,
    trigger_id: int,
    num_id_tokens: int,
    eos_id: int,
    pad_id: int,
    max_length: int = MAX_TOKENS,
    trigger_word: str = DEFAULT_TRIGGER_WORD,
    prompt: str | None = None,
    decode: Callable[[Sequence[int]], str] | None = None,
) -> ExpandedPrompt:
    """Remove the trigger and repeat the class token before it ``num_id_tokens`` times.

    ``token_ids`` is a tokenizer's full output for one prompt: BOS, the words, EOS, *not* truncated
    (truncating first, as the reference did, can silently cut class copies or the EOS token). Too-long
    prompts lose words at the end, as in SDXL, but never the class copies: then a ``PromptError`` says how
    many tokens to remove. ``prompt`` and ``decode`` only improve the error messages.
    """
    if num_id_tokens < 1:
        raise ValueError(f"num_id_tokens must be at least 1, got {num_id_tokens}")
    ids = list(token_ids)
    trigger_at = find_trigger(ids, trigger_id, trigger_word=trigger_word, prompt=prompt)
    class_at = trigger_at - 1
    if class_at < 1:  # index 0 is BOS: nothing names the subject
        raise PromptError(
            f"The trigger word '{trigger_word}' must follow a class word that names the subject, "
            f'e.g. "a man {trigger_word}" or "a woman {trigger_word}"; here nothing comes before it.'
        )
    class_token = ids[class_at]
    expanded = ids[:class_at] + [class_token] * num_id_tokens + ids[trigger_at + 1 :]

    last_copy = class_at + num_id_tokens - 1
    last_allowed = max_length - 2  # the final position is kept for EOS
    if last_copy > last_allowed:
        excess = last_copy - last_allowed
        class_text = f"'{decode([class_token]).strip()}' " if decode else ""
        raise PromptError(
            f"The prompt is too long before its class word {class_text}: with {num_id_tokens} ID token(s) "
            f"the subject no longer fits in {max_length} tokens. Remove at least {excess} token(s) before "
            f"the class word, or use fewer ID photos."
        )

    input_ids, dropped = pad_or_truncate(expanded, eos_id=eos_id, pad_id=pad_id, max_length=max_length)
    mask = [class_at <= i <= last_copy for i in range(max_length)]
    return ExpandedPrompt(input_ids, mask, class_at, dropped)


def add_trigger_token(tokenizer, trigger_word: str = DEFAULT_TRIGGER_WORD) -> int:
    """Add the trigger to a tokenizer as a special token that only matches as a whole word; return its id.

    Whole-word matching (a fix over the reference) keeps "imgur" or "imgs" from producing a trigger.
    """
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(trigger_word, special=True, single_word=True)])
    return tokenizer.convert_tokens_to_ids(trigger_word)


def check_prompt_text(prompt: str, trigger_word: str = DEFAULT_TRIGGER_WORD) -> None:
    """The token-level checks of `expand_class_tokens`, on the user's own text, before any model runs.

    Run it before a style template wraps the prompt: a template's last word ("... of {prompt}") must not
    become the class word of a prompt that starts with the trigger.
    """
    occurrences = list(re.finditer(rf"(?<![\w]){re.escape(trigger_word)}(?![\w])", prompt))
    find_trigger([0] * len(occurrences), 0, trigger_word=trigger_word, prompt=prompt)
    if not re.search(r"\w", prompt[: occurrences[0].start()]):
        raise PromptError(
            f"The trigger word '{trigger_word}' must follow a class word that names the subject, "
            f'e.g. "a man {trigger_word}" or "a woman {trigger_word}"; here nothing comes before it.'
        )


def has_trigger_word(prompt: str, trigger_word: str = DEFAULT_TRIGGER_WORD) -> bool:
    """Whether ``prompt`` contains the trigger as a word of its own (case-sensitive, like the tokenizer)."""
    return re.search(rf"(?<![\w]){re.escape(trigger_word)}(?![\w])", prompt) is not None


def strip_trigger_word(text: str, trigger_word: str = DEFAULT_TRIGGER_WORD) -> tuple[str, bool]:
    """``text`` without the trigger word, and whether it had one.

    For the negative prompt: the trigger only marks the person in the prompt, and its token has no embedding
    in the text encoders (it is replaced before they run), so left in a negative prompt it would crash them.
    """
    pattern = rf"\s*(?<![\w]){re.escape(trigger_word)}(?![\w])"
    stripped, count = re.subn(pattern, "", text)
    return (stripped.strip() if count else text), count > 0


def insert_trigger_word(prompt: str, trigger_word: str = DEFAULT_TRIGGER_WORD) -> tuple[str, str | None]:
    """Add a missing trigger after the first class word; return the prompt and a note for the user.

    Prompts that already have the trigger, or have no known class word, come back unchanged with no note
    (the pipeline then explains what is missing).
    """
    if has_trigger_word(prompt, trigger_word):
        return prompt, None
    match = _CLASS_WORD_PATTERN.search(prompt)
    if match is None:
        return prompt, None
    new_prompt = prompt[: match.end()] + f" {trigger_word}" + prompt[match.end() :]
    note = f"Added the trigger word '{trigger_word}' after the class word '{match.group(0)}': \"{new_prompt}\""
    return new_prompt, note
