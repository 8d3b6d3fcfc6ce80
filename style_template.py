"""The style table, kept at the top level for the Hugging Face Space layout: it lives in `photomaker.styles`."""

from photomaker.styles import DEFAULT_STYLE_NAME, NO_STYLE_NAME, PROMPT_PLACEHOLDER, STYLE_NAMES, STYLES, apply_style

__all__ = ["DEFAULT_STYLE_NAME", "NO_STYLE_NAME", "PROMPT_PLACEHOLDER", "STYLE_NAMES", "STYLES", "apply_style"]
