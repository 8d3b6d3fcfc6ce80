"""Sweeps: ``--sweep KEY=V1,V2,...`` becomes a list of settings, and the fixed seed schedule they share.

A setting changes generation fields (style strength, steps, ...), the number of reference photos, or the model
itself (adapter, base model, version: a new service). Seeds depend only on identity, prompt index and image
index, so every setting draws the same starting noise and differences come from the setting alone.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from photomaker.errors import InvalidRequestError
from photomaker.presets import SEED_MAX

DEFAULT_SETTING = "default"


def _optional_text(value: str) -> str | None:
    """'none' / 'off' / '' mean "not set" (e.g. fast=none for standard sampling)."""
    return None if value.strip().lower() in ("", "none", "off", "no") else value


def _switch(value: str) -> bool:
    from photomaker.service import parse_switch

    return parse_switch(value)


Target = Literal["request", "service", "eval"]
# KEY -> (what it changes, how its text is read)
SWEEP_KEYS: dict[str, tuple[Target, Callable[[str], Any]]] = {
    "style_strength": ("request", float),
    "guidance_scale": ("request", float),
    "num_steps": ("request", int),
    "style": ("request", str),
    "fast": ("request", _optional_text),
    "negative_prompt": ("request", str),
    "aspect_ratio": ("request", str),
    "width": ("request", int),
    "height": ("request", int),
    "best_of": ("request", int),
    "crop_faces": ("request", _switch),
    "num_references": ("eval", int),
    "adapter": ("service", str),
    "base_model": ("service", str),
    "pm_version": ("service", int),
    "dtype": ("service", str),
}
ALIASES = {"steps": "num_steps", "guidance": "guidance_scale", "references": "num_references"}


@dataclass(frozen=True)
class Setting:
    """One point of the sweep: its label (the summary's key) and what it changes."""

    label: str = DEFAULT_SETTING
    request: dict[str, Any] = field(default_factory=dict)
    service: dict[str, Any] = field(default_factory=dict)
    num_references: int | None = None  # None: the --num-references value

    def __hash__(self) -> int:
        return hash(self.label)


def parse_sweep(text: str) -> tuple[str, list[tuple[str, Any]]]:
    """``KEY=V1,V2`` -> (key, [(text, value), ...]); a bad key or value names what to write instead."""
    key, sep, values = text.partition("=")
    key = ALIASES.get(key.strip(), key.strip())
    if not sep or not values.strip():
        raise InvalidRequestError(f"--sweep {text!r}: write KEY=V1,V2,... e.g. --sweep style_strength=15,20,30.")
    if key not in SWEEP_KEYS:
        close = difflib.get_close_matches(key, [*SWEEP_KEYS, *ALIASES], n=1)
        hint = f" Did you mean '{close[0]}'?" if close else f" Known keys: {', '.join(SWEEP_KEYS)}."
        raise InvalidRequestError(f"--sweep {text!r}: unknown key '{key}'.{hint}")
    parse = SWEEP_KEYS[key][1]
    parsed = []
    for item in values.split(","):
        item = item.strip()
        try:
            parsed.append((item, parse(item)))
        except ValueError:
            raise InvalidRequestError(f"--sweep {text!r}: {item!r} is not a valid {key}.") from None
    if len({item for item, _ in parsed}) != len(parsed):
        raise InvalidRequestError(f"--sweep {text!r}: a value is repeated; list each value once.")
    return key, parsed


def build_settings(sweeps: Sequence[str]) -> list[Setting]:
    """Every combination of the sweeps (in the order given); one ``default`` setting without a sweep."""
    if not sweeps:
        return [Setting()]
    axes = [parse_sweep(text) for text in sweeps]
    keys = [key for key, _ in axes]
    if len(set(keys)) != len(keys):
        raise InvalidRequestError(f"--sweep names {', '.join(keys)}: give each key in one --sweep only.")
    settings = []
    for combination in itertools.product(*(values for _, values in axes)):
        request, service, num_references = {}, {}, None
        for key, (_, value) in zip(keys, combination, strict=True):
            target = SWEEP_KEYS[key][0]
            if target == "request":
                request[key] = value
            elif target == "service":
                service[key] = value
            else:
                num_references = value
        label = ", ".join(f"{key}={text}" for key, (text, _) in zip(keys, combination, strict=True))
        settings.append(Setting(label, request, service, num_references))
    return settings


def image_seed(base_seed: int, identity: str, prompt_index: int, image_index: int) -> int:
    """The seed of one image: from the identity, prompt index and image index only (every setting shares it)."""
    digest = hashlib.sha256(f"{base_seed}/{identity}/{prompt_index}/{image_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (SEED_MAX + 1)


def setting_folder(label: str) -> str:
    """A folder name for the setting's images: the label with path-unsafe characters replaced."""
    safe = "".join(char if char.isalnum() or char in "=.-+" else "_" for char in label)
    return safe.strip("._") or DEFAULT_SETTING
