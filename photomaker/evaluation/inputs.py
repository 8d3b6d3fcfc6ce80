"""The evaluation's inputs: the prompt list (checked line by line) and the identity folders.

A prompt names its subject with ``{class}``, filled per identity from the identity folder's ``class.txt``
(default "person"), so one list serves men, women, boys and girls alike, as in the paper's protocol.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from photomaker.errors import IDImageError, InvalidRequestError, PhotoMakerError, PromptError
from photomaker.prompt import DEFAULT_TRIGGER_WORD, check_prompt_text

logger = logging.getLogger(__name__)

CLASS_PLACEHOLDER = "{class}"
CLASS_FILE = "class.txt"
DEFAULT_CLASS_WORD = "person"
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def default_prompts_file() -> Path:
    """The 40 prompts shipped with the library (``photomaker/data/eval_prompts.txt``)."""
    return Path(str(resources.files("photomaker") / "data" / "eval_prompts.txt"))


def fill_class(prompt: str, class_word: str) -> str:
    """The prompt with ``{class}`` replaced by the identity's class word."""
    return prompt.replace(CLASS_PLACEHOLDER, class_word)


def load_prompts(path: str | os.PathLike[str] | None = None, trigger_word: str = DEFAULT_TRIGGER_WORD) -> list[str]:
    """The prompts of `path` (default: the shipped list), one per line; blank lines and ``#`` comments skipped.

    Each line must hold the trigger word once, after a class word or ``{class}``; a bad line raises
    `PromptError` naming the file and line.
    """
    path = Path(path) if path is not None else default_prompts_file()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidRequestError(f"prompts file {str(path)!r} not found.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidRequestError(f"cannot read prompts file {str(path)!r}: {error}") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        prompt = line.strip()
        if not prompt or prompt.startswith("#"):
            continue
        try:
            check_prompt_text(fill_class(prompt, DEFAULT_CLASS_WORD), trigger_word)
        except PromptError as error:
            raise PromptError(f"{path} line {number} ({prompt!r}): {error}") from None
        prompts.append(prompt)
    if not prompts:
        raise InvalidRequestError(
            f"prompts file {str(path)!r} has no prompts (one per line, e.g. "
            f"'a photo of a {CLASS_PLACEHOLDER} {trigger_word} on a beach')."
        )
    return prompts


@dataclass(frozen=True)
class Identity:
    """One person: a folder of reference photos (sorted by name) and the class word prompts use."""

    name: str
    photos: tuple[Path, ...]
    class_word: str = DEFAULT_CLASS_WORD


def _read_class_word(path: Path) -> str:
    word = path.read_text(encoding="utf-8").strip()
    if not word or len(word.split()) > 3:
        raise InvalidRequestError(f"{path} must hold one class word such as 'man', 'woman' or 'person', got {word!r}.")
    return word


def load_identities(ids_dir: str | os.PathLike[str]) -> list[Identity]:
    """Every sub-folder of `ids_dir` that holds photos, sorted by name."""
    root = Path(ids_dir)
    if not root.is_dir():
        raise InvalidRequestError(
            f"identities folder {str(root)!r} not found; --ids needs a folder with one sub-folder of photos per person."
        )
    identities = []
    for folder in sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith(".")):
        files = [path for path in folder.iterdir() if path.is_file() and not path.name.startswith(".")]
        photos = tuple(sorted(path for path in files if path.suffix.lower() in PHOTO_SUFFIXES))
        skipped = sorted(path.name for path in files if path not in photos and path.name != CLASS_FILE)
        if skipped:
            logger.warning(
                "identity folder %s: %s not used (photos must be %s)",
                folder,
                ", ".join(skipped),
                ", ".join(PHOTO_SUFFIXES),
            )
        if not photos:
            raise IDImageError(f"identity folder {str(folder)!r} has no photos ({', '.join(PHOTO_SUFFIXES)}).")
        class_file = folder / CLASS_FILE
        class_word = _read_class_word(class_file) if class_file.is_file() else DEFAULT_CLASS_WORD
        identities.append(Identity(folder.name, photos, class_word))
    if not identities:
        raise InvalidRequestError(
            f"identities folder {str(root)!r} has no sub-folders; put each person's photos "
            "in a folder of their own, e.g. IDS/alice/1.jpg."
        )
    return identities


def check_identity_prompts(
    identities: list[Identity], prompts: list[str], trigger_word: str = DEFAULT_TRIGGER_WORD
) -> None:
    """Every prompt must still be valid with every identity's class word filled in."""
    for identity in identities:
        for prompt in prompts:
            try:
                check_prompt_text(fill_class(prompt, identity.class_word), trigger_word)
            except PhotoMakerError as error:
                raise PromptError(
                    f"prompt {prompt!r} with class word {identity.class_word!r} of identity {identity.name!r}: {error}"
                ) from None
