"""What the user reads: summary.json, the markdown table, the differences to another run, and the trade-off plot.

The table shows cosines (Face Sim, Face Div, CLIP-I, DINO) x 100 like the paper's Table 1; summary.json keeps
them as plain cosines, and CLIP-T is x 100 in both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from photomaker.errors import InvalidRequestError

SUMMARY_FILE = "summary.json"
PLOT_FILE = "face_sim_vs_clip_t.png"
# (summary key, column title, factor shown in the table)
COLUMNS = (
    ("face_sim", "Face Sim", 100.0),
    ("face_div", "Face Div", 100.0),
    ("clip_t", "CLIP-T", 1.0),
    ("clip_i", "CLIP-I", 100.0),
    ("dino", "DINO", 100.0),
    ("fid", "FID", 1.0),
    ("no_face_rate", "no face %", 100.0),
    ("seconds_per_image", "s/image", 1.0),
    ("n", "n", 1.0),
)


def _columns(summary: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str, float]]:
    """The columns present in `summary` (FID only when computed)."""
    return [column for column in COLUMNS if any(column[0] in values for values in summary.values())]


def _cell(value: Any, factor: float) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{float(value) * factor:.2f}"


def markdown_table(summary: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per setting; cosines x 100 as in the paper."""
    columns = _columns(summary)
    lines = ["| setting | " + " | ".join(title for _, title, _ in columns) + " |", "|---|" + "---:|" * len(columns)]
    for setting, values in summary.items():
        lines.append(
            f"| {setting} | " + " | ".join(_cell(values.get(key), factor) for key, _, factor in columns) + " |"
        )
    return "\n".join(lines)


def write_summary(summary: Mapping[str, Mapping[str, Any]], out_dir: Path) -> Path:
    path = out_dir / SUMMARY_FILE
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return path


def read_summary(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """An earlier run's summary.json; a missing or malformed file says what was expected."""
    path = Path(path)
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidRequestError(
            f"--compare: {str(path)!r} not found; give the summary.json of another run."
        ) from None
    except (OSError, ValueError) as error:
        raise InvalidRequestError(f"--compare: cannot read {str(path)!r} as JSON: {error}") from None
    if not isinstance(summary, dict) or not all(isinstance(values, dict) for values in summary.values()):
        raise InvalidRequestError(f"--compare: {str(path)!r} is not an eval summary ({{setting: {{metric: value}}}}).")
    return summary


def compare(summary: Mapping[str, Mapping[str, Any]], other: Mapping[str, Mapping[str, Any]]) -> str:
    """A markdown table of this run minus the other, per setting both runs have (cosines x 100).

    With one setting on each side (e.g. two "default" runs of different models) those two are compared.
    """
    pairs = [(name, name) for name in summary if name in other]
    if not pairs and len(summary) == 1 and len(other) == 1:
        pairs = [(next(iter(summary)), next(iter(other)))]
    if not pairs:
        raise InvalidRequestError(
            f"--compare: no setting in common (this run: {', '.join(summary)}; other: "
            f"{', '.join(other)}); compare runs of the same sweep."
        )
    columns = [column for column in _columns({**summary, **other}) if column[0] != "n"]
    lines = [
        "| setting | " + " | ".join(f"Δ {title}" for _, title, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for mine, theirs in pairs:
        cells = []
        for key, _, factor in columns:
            a, b = summary[mine].get(key), other[theirs].get(key)
            cells.append("-" if a is None or b is None else f"{(float(a) - float(b)) * factor:+.2f}")
        label = mine if mine == theirs else f"{mine} vs {theirs}"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_tradeoff(summary: Mapping[str, Mapping[str, Any]], path: Path, size: tuple[int, int] = (640, 480)) -> Path:
    """A scatter plot of Face Sim (y) against CLIP-T (x), one labelled point per setting, drawn with PIL.

    Settings without a Face Sim (no face found anywhere) are listed under the plot instead of placed on it.
    """
    width, height = size
    left, right, top, bottom = 70, 20, 30, 70
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    placed = {
        name: (values["clip_t"], values["face_sim"] * 100)
        for name, values in summary.items()
        if values.get("clip_t") is not None and values.get("face_sim") is not None
    }
    unplaced = [name for name in summary if name not in placed]

    xs = [x for x, _ in placed.values()] or [0.0]
    ys = [y for _, y in placed.values()] or [0.0]

    def span(values: list[float]) -> tuple[float, float]:
        low, high = min(values), max(values)
        pad = max((high - low) * 0.1, 0.5)
        return low - pad, high + pad

    (x0, x1), (y0, y1) = span(xs), span(ys)

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - x0) / (x1 - x0) * (width - left - right),
            height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom),
        )

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for fraction in (0.0, 0.5, 1.0):
        x = x0 + fraction * (x1 - x0)
        y = y0 + fraction * (y1 - y0)
        px, _ = to_pixel(x, y0)
        _, py = to_pixel(x0, y)
        draw.text((px - 12, height - bottom + 5), f"{x:.1f}", fill="black", font=font)
        draw.text((left - 45, py - 6), f"{y:.1f}", fill="black", font=font)
    draw.text(((width - 80) // 2, height - bottom + 22), "CLIP-T", fill="black", font=font)
    draw.text((5, top - 20), "Face Sim (cosine x100)", fill="black", font=font)
    for index, (name, (x, y)) in enumerate(placed.items()):
        px, py = to_pixel(x, y)
        colour = _COLOURS[index % len(_COLOURS)]
        draw.ellipse([px - 5, py - 5, px + 5, py + 5], fill=colour)
        text_width = draw.textlength(name, font=font)
        text_x = px + 8 if px + 8 + text_width <= width - 2 else px - 8 - text_width  # keep labels inside
        draw.text((text_x, py - 6), name, fill=colour, font=font)
    if unplaced:
        draw.text((left, height - 22), "no Face Sim: " + "; ".join(unplaced)[:90], fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
