"""Training captions: the given caption, a captioning model's, or the template, with the class word marked.

PhotoMaker learns from captions in which the subject's class word is followed by the trigger word
(``"a photo of a man img smiling"``). Rules, in order:

- a caption that already has the trigger (once, after a word) is kept as is;
- otherwise the trigger goes right after the first occurrence of the identity's class word;
- a *model* caption without that class word has its first generic subject word (``photomaker.prompt``'s
  ``CLASS_WORDS``: woman, man, person, ...) replaced by the class word, since captioners name people freely;
- a caption that still cannot be marked is rejected (``ImageRejected("caption")``): the image is dropped and
  reported, because a silently substituted template would hide a caption the user wrote on purpose.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from PIL import Image

from photomaker.errors import ImageRejected, ModelLoadError, PromptError
from photomaker.prompt import CLASS_WORDS, check_prompt_text, has_trigger_word

logger = logging.getLogger(__name__)

CAPTION_TEMPLATE = "a photo of a {class_word} {trigger_word}"
"""The caption of an image that has no caption of its own and no captioning model."""

_GENERIC_SUBJECT = re.compile(r"\b(" + "|".join(CLASS_WORDS) + r")\b", re.IGNORECASE)


def mark_class_word(caption: str, class_word: str, trigger_word: str, *, from_model: bool = False) -> str:
    """``caption`` with ``trigger_word`` right after ``class_word`` (see the module docstring for the rules)."""
    caption = " ".join(caption.split())
    if not caption:
        raise ImageRejected("caption", "the caption is empty; write one or delete the empty .txt file")
    if has_trigger_word(caption, trigger_word):
        try:
            check_prompt_text(caption, trigger_word)
        except PromptError as exc:
            raise ImageRejected("caption", f"{exc} (caption: {caption!r})") from exc
        return caption
    match = re.search(rf"\b{re.escape(class_word)}\b", caption, re.IGNORECASE)
    if match is None and from_model:
        generic = _GENERIC_SUBJECT.search(caption)
        if generic is not None:
            caption = caption[: generic.start()] + class_word + caption[generic.end() :]
            match = re.search(rf"\b{re.escape(class_word)}\b", caption, re.IGNORECASE)
    if match is None:
        raise ImageRejected(
            "caption",
            f"the caption {caption!r} has no class word {class_word!r} to mark with {trigger_word!r}; add it "
            f'(e.g. "a {class_word} {trigger_word} ...") or set the identity\'s class word to the word it uses',
        )
    return caption[: match.end()] + f" {trigger_word}" + caption[match.end() :]


def template_caption(class_word: str, trigger_word: str) -> str:
    """:data:`CAPTION_TEMPLATE` filled in."""
    return CAPTION_TEMPLATE.format(class_word=class_word, trigger_word=trigger_word)


class Captioner:
    """Captions images with a transformers image-to-text model (e.g. BLIP, BLIP-2) from the Hub or a folder."""

    def __init__(self, model: str, device: str | None = None, max_new_tokens: int = 40) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            self._processor = AutoProcessor.from_pretrained(model)
            self._model = AutoModelForImageTextToText.from_pretrained(model)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"could not load the captioning model {model!r}: {exc}. It must be a transformers image-to-text "
                "model such as Salesforce/blip-image-captioning-large: a Hub id (needs network access, or a copy "
                f"in the Hugging Face cache made with 'hf download {model}' while online) or a local folder; or "
                "leave --caption-model out to use the given captions and the template"
            ) from exc
        self._model.eval()
        if device is not None:
            self._model.to(device)
        self.model_name = model
        self.max_new_tokens = max_new_tokens

    def __call__(self, image: Image.Image) -> str:
        import torch

        inputs = self._processor(images=image, return_tensors="pt").to(self._model.device)
        with torch.inference_mode():
            ids = self._model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        return self._processor.batch_decode(ids, skip_special_tokens=True)[0].strip()


def make_caption(
    image: Image.Image,
    given: str | None,
    class_word: str,
    trigger_word: str,
    captioner: Callable[[Image.Image], str] | None = None,
) -> str:
    """The marked caption of one training image: the given one, else the model's, else the template."""
    if given is not None:
        return mark_class_word(given, class_word, trigger_word)
    if captioner is not None:
        return mark_class_word(captioner(image), class_word, trigger_word, from_model=True)
    return template_caption(class_word, trigger_word)
