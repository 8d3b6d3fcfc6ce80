"""The style and aspect-ratio tables that the app's dropdowns, the CLI and the service share."""

from __future__ import annotations

import re

import pytest

from aspect_ratio_template import (
    ASPECT_RATIO_NAMES,
    ASPECT_RATIOS,
    DEFAULT_ASPECT_RATIO,
    get_size,
)
from photomaker.errors import InvalidRequestError
from style_template import (
    DEFAULT_STYLE_NAME,
    NO_STYLE_NAME,
    STYLE_NAMES,
    STYLES,
    apply_style,
)


def test_at_least_eleven_styles_plus_no_style_and_default() -> None:
    assert len(STYLES) >= 12
    assert NO_STYLE_NAME == "(No style)" and NO_STYLE_NAME in STYLES
    assert DEFAULT_STYLE_NAME == "Photographic (Default)" and DEFAULT_STYLE_NAME in STYLES
    assert STYLE_NAMES == list(STYLES)


@pytest.mark.parametrize("name", list(STYLES))
def test_every_template_holds_the_prompt_exactly_once(name: str) -> None:
    template, negative = STYLES[name]
    assert template.count("{prompt}") == 1
    positive, _ = apply_style(name, "a man img riding a bike")
    assert "a man img riding a bike" in positive and "{prompt}" not in positive
    if name != NO_STYLE_NAME:
        assert negative and positive != "a man img riding a bike"


def test_styles_are_distinct() -> None:
    templates = [template for template, _ in STYLES.values()]
    negatives = [negative for _, negative in STYLES.values() if negative]
    assert len(set(templates)) == len(templates)
    assert len(set(negatives)) == len(negatives)


def test_no_style_leaves_prompt_and_negative_untouched() -> None:
    assert apply_style(NO_STYLE_NAME, "a woman img") == ("a woman img", "")
    assert apply_style(NO_STYLE_NAME, "a woman img", "  blurry ") == ("a woman img", "blurry")


def test_negative_is_style_negative_then_user_negative() -> None:
    style_negative = STYLES[DEFAULT_STYLE_NAME][1]
    _, negative = apply_style(DEFAULT_STYLE_NAME, "a man img", "extra fingers")
    assert negative == f"{style_negative} extra fingers"
    _, negative = apply_style(DEFAULT_STYLE_NAME, "a man img")
    assert negative == style_negative


def test_braces_in_the_prompt_survive() -> None:
    positive, _ = apply_style("Cinematic", "a man img holding a sign saying {hello} {prompt}")
    assert "{hello} {prompt}" in positive


def test_unknown_style_lists_the_valid_names() -> None:
    with pytest.raises(InvalidRequestError) as info:
        apply_style("Cinematc", "a man img")
    message = str(info.value)
    assert "'Cinematc'" in message
    assert all(name in message for name in STYLE_NAMES)


def test_fourteen_aspect_ratios_with_square_default() -> None:
    assert len(ASPECT_RATIOS) == 14
    assert ASPECT_RATIO_NAMES == list(ASPECT_RATIOS)
    assert DEFAULT_ASPECT_RATIO == "Instagram (1:1)"
    assert get_size(DEFAULT_ASPECT_RATIO) == (1024, 1024)


@pytest.mark.parametrize("name", list(ASPECT_RATIOS))
def test_aspect_sizes_are_multiples_of_8_and_match_their_ratio(name: str) -> None:
    width, height = get_size(name)
    assert width % 8 == 0 and height % 8 == 0
    assert max(width, height) == 1024
    a, b = (float(x) for x in re.search(r"\(([\d.]+):([\d.]+)\)", name).groups())
    assert width / height == pytest.approx(a / b, rel=0.02)


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("35mm film / Landscape (3:2)", (1024, 680)),
        ("Widescreen TV / Portrait (9:16)", (576, 1024)),
        ("Cinemascope (2.39:1)", (1024, 424)),
        ("Widescreen Movie (1.85:1)", (1024, 552)),
        ("Academy Movie (1.37:1)", (1024, 744)),
        ("Sheet-print (A-series) / Portrait (210:297)", (720, 1024)),
    ],
)
def test_aspect_sizes_are_the_published_ones(name: str, size: tuple[int, int]) -> None:
    assert get_size(name) == size


def test_unknown_aspect_ratio_lists_the_valid_names() -> None:
    with pytest.raises(InvalidRequestError) as info:
        get_size("Square")
    assert "'Square'" in str(info.value) and DEFAULT_ASPECT_RATIO in str(info.value)
