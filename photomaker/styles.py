"""Style templates: a name -> (positive template with "{prompt}", negative prompt) table, shared by the app,
the CLI and the service.

The texts were written for this project. A style wraps the user's prompt in words that steer the look; its
negative prompt lists what the look should avoid. `apply_style` combines the style's negative with the user's
own, style first (the order of the official demo).
"""

from __future__ import annotations

from photomaker.errors import InvalidRequestError

PROMPT_PLACEHOLDER = "{prompt}"
DEFAULT_STYLE_NAME = "Photographic (Default)"
NO_STYLE_NAME = "(No style)"

STYLES: dict[str, tuple[str, str]] = {
    NO_STYLE_NAME: (PROMPT_PLACEHOLDER, ""),
    DEFAULT_STYLE_NAME: (
        (
            "candid photograph of {prompt}, natural window light, 50mm lens, shallow depth of field, "
            "true-to-life skin texture and colour"
        ),
        (
            "painting, drawing, illustration, cartoon, anime, cgi render, plastic-looking skin, oversaturated, "
            "blurry, low resolution, watermark, text"
        ),
    ),
    "Cinematic": (
        (
            "film still of {prompt}, anamorphic widescreen framing, moody teal and amber grade, soft haze, "
            "dramatic rim light, fine film grain"
        ),
        "flat lighting, phone snapshot, cartoon, illustration, oversaturated, low resolution, watermark",
    ),
    "Animated Feature": (
        (
            "{prompt} as the hero of a 3D animated feature film, expressive large eyes, soft bounce lighting, "
            "vibrant friendly palette, polished render"
        ),
        "photograph, realistic pores, gritty, horror, low resolution, deformed anatomy",
    ),
    "Digital Art": (
        (
            "digital painting of {prompt}, confident visible brush strokes, rich colour, concept art sheet, "
            "intricate detail"
        ),
        "photograph, photo noise, grainy, low resolution, blurry, watermark",
    ),
    "Fantasy Art": (
        (
            "epic fantasy portrait of {prompt}, ornate armour and flowing cloth, glowing arcane light, "
            "painterly, highly detailed"
        ),
        "photograph, modern clothing, plain backdrop, low resolution, deformed anatomy",
    ),
    "Neonpunk": (
        (
            "{prompt} on a rain-soaked street of a neon-lit city at night, magenta and cyan signs, glossy "
            "reflections, futuristic atmosphere, crisp detail"
        ),
        "daylight, countryside, muted colours, oil painting, low resolution",
    ),
    "Enhance": (
        "{prompt}, striking image, sharp focus, balanced composition, refined detail, professional finish",
        "low resolution, blurry, jpeg artifacts, distorted, watermark, text",
    ),
    "Comic Book": (
        ("comic book panel of {prompt}, bold ink outlines, halftone dot shading, flat vivid colours, dynamic pose"),
        "photograph, realistic, 3d render, blurry, low resolution",
    ),
    "Lowpoly": (
        (
            "low-poly 3D model of {prompt}, faceted geometry, flat-shaded polygons, clean pastel palette, "
            "simple studio backdrop"
        ),
        "photograph, noisy, smooth organic surfaces, realistic texture, low resolution",
    ),
    "Line Art": (
        "clean line drawing of {prompt}, black ink on white paper, precise contour lines, minimal shading",
        "colour, photograph, painting, soft gradients, blurry, low resolution",
    ),
    "Watercolor": (
        (
            "loose watercolour painting of {prompt}, soft translucent washes, visible paper texture, gentle "
            "bleeding edges"
        ),
        "photograph, hard edges, 3d render, harsh contrast, low resolution",
    ),
    "Vintage Film": (
        ("1970s film photograph of {prompt}, warm faded colours, light leaks, visible grain, slightly soft corners"),
        "digital look, hdr, oversharpened, cartoon, low resolution",
    ),
    "Oil Painting": (
        (
            "oil painting portrait of {prompt}, thick impasto brushwork, chiaroscuro lighting, classical "
            "composition, canvas texture"
        ),
        "photograph, flat colours, cartoon, 3d render, low resolution",
    ),
}

STYLE_NAMES: list[str] = list(STYLES)


def apply_style(style_name: str, prompt: str, negative: str = "") -> tuple[str, str]:
    """Return (positive, negative) for `prompt` in `style_name`.

    The negative is the style's negative followed by the user's, so the user's words come last
    and an unstyled request with no negative gives "" (which the pipeline turns into zero embeddings).
    """
    try:
        template, style_negative = STYLES[style_name]
    except KeyError:
        raise InvalidRequestError(f"Unknown style {style_name!r}. Choose one of: {', '.join(STYLE_NAMES)}.") from None
    # str.replace, not str.format: a user prompt may contain braces.
    positive = template.replace(PROMPT_PLACEHOLDER, prompt)
    return positive, f"{style_negative} {negative}".strip()
