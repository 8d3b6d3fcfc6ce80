"""Aspect-ratio presets: name -> (width, height) in pixels, every side a multiple of 8 (the VAE's factor).

The long side is 1024, SDXL's training resolution; the short side is the ratio rounded to a multiple of 8.
"""

from __future__ import annotations

from photomaker.errors import InvalidRequestError

DEFAULT_ASPECT_RATIO = "Instagram (1:1)"

ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "Instagram (1:1)": (1024, 1024),
    "35mm film / Landscape (3:2)": (1024, 680),
    "35mm film / Portrait (2:3)": (680, 1024),
    "CRT Monitor / Landscape (4:3)": (1024, 768),
    "CRT Monitor / Portrait (3:4)": (768, 1024),
    "Widescreen TV / Landscape (16:9)": (1024, 576),
    "Widescreen TV / Portrait (9:16)": (576, 1024),
    "Widescreen Monitor / Landscape (16:10)": (1024, 640),
    "Widescreen Monitor / Portrait (10:16)": (640, 1024),
    "Cinemascope (2.39:1)": (1024, 424),
    "Widescreen Movie (1.85:1)": (1024, 552),
    "Academy Movie (1.37:1)": (1024, 744),
    "Sheet-print (A-series) / Landscape (297:210)": (1024, 720),
    "Sheet-print (A-series) / Portrait (210:297)": (720, 1024),
}

ASPECT_RATIO_NAMES: list[str] = list(ASPECT_RATIOS)


def get_size(name: str) -> tuple[int, int]:
    """(width, height) of the preset `name`."""
    try:
        return ASPECT_RATIOS[name]
    except KeyError:
        raise InvalidRequestError(
            f"Unknown aspect ratio {name!r}. Choose one of: {', '.join(ASPECT_RATIO_NAMES)}."
        ) from None
