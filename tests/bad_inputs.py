"""Builders of awkward and hostile image files for the robustness tests.

Every builder writes one file into a folder and returns its path. Files that should be *accepted* (odd but
valid photos) are made from the NASA astronaut portrait in ``examples/``, so that a face detector still finds
the face after the file has been decoded correctly; files that should be *refused* are broken or oversized in
one specific way each. ``build_all(folder)`` writes every one of them and returns ``{name: path}``.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from photomaker.images import MAX_IMAGE_PIXELS, MAX_UPLOAD_BYTES

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ASTRONAUT = EXAMPLES / "astronaut.png"
HOPPER = EXAMPLES / "grace_hopper.jpg"

EXIF_ORIENTATION = 0x0112
# Size claimed by the header-only PNG: 10 gigapixels, 30 GB as RGB if anything tried to allocate it.
CLAIMED_SIZE = (100_000, 100_000)
# A real, fully valid image just over the pixel limit (a "decompression bomb" of a few kilobytes).
BOMB_SIZE = (8000, MAX_IMAGE_PIXELS // 8000 + 8)


def portrait() -> Image.Image:
    """The astronaut portrait as an RGB image (512x512, one clearly visible face)."""
    with Image.open(ASTRONAUT) as image:
        return image.convert("RGB")


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    body = kind + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


# ------------------------------------------------------------------------------------------- refused files


def text_named_jpg(folder: Path) -> Path:
    """A plain text file with a .jpg name."""
    path = folder / "holiday.jpg"
    path.write_text("Dear diary, today I uploaded a text file instead of a photo.\n" * 20, encoding="utf-8")
    return path


def truncated_jpeg(folder: Path) -> Path:
    """Grace Hopper's JPEG cut off in the middle of its compressed data (header intact)."""
    data = HOPPER.read_bytes()
    path = folder / "truncated.jpg"
    path.write_bytes(data[: len(data) // 3])
    return path


def empty_file(folder: Path) -> Path:
    """Zero bytes, named like a photo."""
    path = folder / "empty.png"
    path.write_bytes(b"")
    return path


def png_claiming_huge_size(folder: Path, size: tuple[int, int] = CLAIMED_SIZE) -> Path:
    """A ~100-byte PNG whose IHDR claims ``size`` (a decoder that trusted it would allocate gigabytes)."""
    ihdr = struct.pack(">IIBBBBB", size[0], size[1], 8, 2, 0, 0, 0)
    idat = zlib.compress(bytes(256))
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    path = folder / "claims_huge.png"
    path.write_bytes(data)
    return path


def pixel_bomb(folder: Path, size: tuple[int, int] = BOMB_SIZE) -> Path:
    """A genuine, complete greyscale PNG just above ``MAX_IMAGE_PIXELS`` that compresses to a few kB."""
    assert size[0] * size[1] > MAX_IMAGE_PIXELS
    path = folder / "pixel_bomb.png"
    Image.new("L", size, 128).save(path, "PNG", compress_level=1)
    return path


def oversized_photo(folder: Path, min_bytes: int = MAX_UPLOAD_BYTES + 1) -> Path:
    """A real photo (the astronaut, enlarged) stored uncompressed so that it weighs more than ``min_bytes``.

    Its pixel count stays under ``MAX_IMAGE_PIXELS``, so the byte limit is the only reason to refuse it.
    """
    side = int(np.ceil(np.sqrt(min_bytes / 3))) + 16
    assert side * side <= MAX_IMAGE_PIXELS
    path = folder / "huge_photo.png"
    portrait().resize((side, side), Image.Resampling.BILINEAR).save(path, "PNG", compress_level=0)
    assert path.stat().st_size > min_bytes
    return path


def no_face(folder: Path) -> Path:
    """A valid photo of coloured noise: nothing a face detector could take for a face."""
    pixels = np.random.default_rng(6).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    path = folder / "noise.png"
    Image.fromarray(pixels).save(path)
    return path


# ------------------------------------------------------------------------------ odd but valid photos


def animated_gif(folder: Path) -> Path:
    """A 3-frame GIF whose first frame is the portrait (the one that must be used)."""
    first = portrait().quantize(256, method=Image.Quantize.FASTOCTREE)
    others = [Image.new("RGB", first.size, colour).quantize(4) for colour in ((0, 160, 0), (0, 0, 160))]
    path = folder / "animated.gif"
    first.save(path, "GIF", save_all=True, append_images=others, duration=200, loop=0)
    return path


def png_16bit(folder: Path) -> Path:
    """The portrait as a 16-bit greyscale PNG (values up to 65535: naive conversion would clip it white)."""
    grey = np.asarray(portrait().convert("L"), dtype=np.uint16) * 257
    path = folder / "deep_16bit.png"
    Image.fromarray(grey).save(path, "PNG")
    with Image.open(path) as check:
        assert check.mode.startswith("I"), check.mode
    return path


def cmyk_jpeg(folder: Path) -> Path:
    """The portrait as a CMYK JPEG (as print workflows export)."""
    path = folder / "print_cmyk.jpg"
    portrait().convert("CMYK").save(path, "JPEG", quality=92)
    return path


def grayscale_jpeg(folder: Path) -> Path:
    """The portrait in black and white (mode L)."""
    path = folder / "black_and_white.jpg"
    portrait().convert("L").save(path, "JPEG", quality=92)
    return path


def rgba_transparent(folder: Path) -> Path:
    """The portrait as RGBA with a fully transparent border whose hidden colour is black."""
    rgba = np.dstack([np.asarray(portrait()), np.full((512, 512), 255, np.uint8)])
    rgba[:48, :, :] = 0
    rgba[-48:, :, :] = 0
    rgba[:, :48, :] = 0
    rgba[:, -48:, :] = 0
    path = folder / "transparent.png"
    Image.fromarray(rgba, "RGBA").save(path, "PNG")
    return path


def exif_rotated(folder: Path) -> Path:
    """The portrait stored lying on its side, with EXIF orientation 6 ("rotate 90° clockwise to display").

    A loader that ignores EXIF sees a face turned by 90°, which a frontal face detector does not find.
    """
    stored = portrait().transpose(Image.Transpose.ROTATE_90)  # counter-clockwise: displayed upright after 6
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    path = folder / "phone_rotated.jpg"
    stored.save(path, "JPEG", quality=92, exif=exif.tobytes())
    return path


def png_named_jpg(folder: Path) -> Path:
    """A valid PNG whose name says .jpg (the content decides, not the extension)."""
    path = folder / "really_a_png.jpg"
    portrait().save(path, "PNG")
    return path


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "text_named_jpg": text_named_jpg,
    "truncated_jpeg": truncated_jpeg,
    "empty_file": empty_file,
    "png_claiming_huge_size": png_claiming_huge_size,
    "pixel_bomb": pixel_bomb,
    "oversized_photo": oversized_photo,
    "no_face": no_face,
    "animated_gif": animated_gif,
    "png_16bit": png_16bit,
    "cmyk_jpeg": cmyk_jpeg,
    "grayscale_jpeg": grayscale_jpeg,
    "rgba_transparent": rgba_transparent,
    "exif_rotated": exif_rotated,
    "png_named_jpg": png_named_jpg,
}


def build_all(folder: Path) -> dict[str, Path]:
    """Write every file of the catalogue into ``folder``; ``{builder name: path}``."""
    folder.mkdir(parents=True, exist_ok=True)
    return {name: build(folder) for name, build in BUILDERS.items()}


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    """``image`` encoded in memory."""
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()
