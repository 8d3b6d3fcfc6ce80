"""The aspect-ratio presets, kept at the top level for the Hugging Face Space layout: they live in
`photomaker.aspect_ratios`."""

from photomaker.aspect_ratios import ASPECT_RATIO_NAMES, ASPECT_RATIOS, DEFAULT_ASPECT_RATIO, get_size

__all__ = ["ASPECT_RATIO_NAMES", "ASPECT_RATIOS", "DEFAULT_ASPECT_RATIO", "get_size"]
