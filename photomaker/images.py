"""Decode any user-supplied image safely into an RGB ``PIL.Image``.

Every entry point (app uploads, CLI paths, service requests, tests) goes through :func:`load_image` so that
the same limits and the same mode handling apply everywhere. Refusals raise
:class:`~photomaker.errors.IDImageError` with a message that names the photo and says what to do.

Limits are checked as early as possible: the byte count before reading the file, the pixel count from the
header before any pixel data is decoded (a PNG header can claim 100000x100000 in a few bytes).
Nothing heavy is imported here: torch tensors are recognised without importing torch.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from photomaker.errors import IDImageError

logger = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
"""Largest encoded image accepted (20 MiB): a generous phone photo is 3-8 MiB."""

MAX_IMAGE_PIXELS = 40_000_000
"""Largest decoded image accepted (40 megapixels, 160 MB as RGBA): above any phone camera's output."""

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO | Image.Image | np.ndarray | Any

_FIX_FORMAT = "use a JPEG, PNG or WebP photo"

# Modes whose pixels carry an alpha channel; transparent areas are composited onto white.
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def load_image(
    source: ImageSource,
    *,
    name: str | None = None,
    max_bytes: int = MAX_UPLOAD_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
    keep_alpha: bool = False,
) -> Image.Image:
    """Return ``source`` as a fully decoded RGB image with its EXIF orientation applied.

    With ``keep_alpha`` an image with transparency comes back as RGBA instead of composited onto white (a
    drawing canvas's strokes live in its alpha channel).

    ``source`` may be a path, encoded bytes, a binary file object, a PIL image, a numpy array (HxW, HxWx1/3/4;
    uint8, uint16, or float in [0, 1]) or a torch tensor ([3,H,W], [H,W,3], optionally with a batch dim of 1;
    float in [0, 1] or uint8). ``name`` is used in error messages; it defaults to the path or file name.
    """
    if isinstance(source, (str, os.PathLike)):
        label = name or str(source)
        return _decode_bytes(_read_path(Path(source), label, max_bytes), label, max_pixels, keep_alpha)
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "the uploaded image"
        data = bytes(source)
        _check_byte_count(len(data), label, max_bytes)
        return _decode_bytes(data, label, max_pixels, keep_alpha)
    if isinstance(source, Image.Image):
        label = name or _pil_label(source)
        return _finish(source, label, max_pixels, keep_alpha)
    if isinstance(source, np.ndarray):
        return _from_array(source, name or "the image array", max_pixels, channels_first=False, keep_alpha=keep_alpha)
    if _is_torch_tensor(source):
        label = name or "the image tensor"
        return _from_array(_tensor_to_numpy(source), label, max_pixels, channels_first=True, keep_alpha=keep_alpha)
    if hasattr(source, "read"):
        label = name or _file_label(source)
        data = source.read(max_bytes + 1)
        if not isinstance(data, (bytes, bytearray)):
            raise IDImageError(f"{label}: the file was opened in text mode; open it with 'rb'")
        _check_byte_count(len(data), label, max_bytes)
        return _decode_bytes(bytes(data), label, max_pixels, keep_alpha)
    raise IDImageError(
        f"{name or 'the photo'}: cannot use an object of type {type(source).__name__} as an image; "
        "pass a file path, image bytes, a PIL image, a numpy array or a torch tensor"
    )


def _read_path(path: Path, label: str, max_bytes: int) -> bytes:
    """Read a file after checking that it exists and is not too large (checked before reading)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise IDImageError(f"{label}: file not found; check the path") from None
    except OSError as exc:
        raise IDImageError(f"{label}: cannot read the file ({exc.strerror}); check the path and permissions") from exc
    if path.is_dir():
        raise IDImageError(f"{label}: is a folder, not an image file; pass the photo's file path")
    _check_byte_count(size, label, max_bytes)
    try:
        with path.open("rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise IDImageError(f"{label}: cannot read the file ({exc.strerror}); check its permissions") from exc
    _check_byte_count(len(data), label, max_bytes)
    return data


def _check_byte_count(size: int, label: str, max_bytes: int) -> None:
    if size == 0:
        raise IDImageError(f"{label}: the file is empty (0 bytes); {_FIX_FORMAT}")
    if size > max_bytes:
        raise IDImageError(
            f"{label}: the file is too large ({_mib(size)} MiB, the limit is {_mib(max_bytes)} MiB); "
            "resize or re-save the photo as a JPEG"
        )


def _decode_bytes(data: bytes, label: str, max_pixels: int, keep_alpha: bool = False) -> Image.Image:
    """Open encoded data, check the header's size, then force a full decode so corrupt data fails here."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise _too_many_pixels(label, None, max_pixels) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise IDImageError(f"{label}: not a readable image file; {_FIX_FORMAT}") from None
    return _finish(image, label, max_pixels, keep_alpha)


def _finish(image: Image.Image, label: str, max_pixels: int, keep_alpha: bool = False) -> Image.Image:
    """Size checks on the header, first frame, full decode, EXIF rotation, conversion to RGB."""
    _check_pixel_count(image.size, label, max_pixels)
    if getattr(image, "n_frames", 1) > 1:
        logger.info("%s: animated image with %d frames; using the first frame", label, image.n_frames)
        image.seek(0)
    try:
        image.load()
    except Image.DecompressionBombError:
        raise _too_many_pixels(label, image.size, max_pixels) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise IDImageError(
            f"{label}: the image data is truncated or corrupt ({exc}); re-export or re-upload the photo"
        ) from None
    try:
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError) as exc:
        logger.warning("%s: ignoring unreadable EXIF orientation (%s)", label, exc)
    return _to_rgb(image, label, keep_alpha)


def _check_pixel_count(size: tuple[int, int], label: str, max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise IDImageError(f"{label}: the image has zero size ({width}x{height}); {_FIX_FORMAT}")
    if width * height > max_pixels:
        raise _too_many_pixels(label, size, max_pixels)


def _too_many_pixels(label: str, size: tuple[int, int] | None, max_pixels: int) -> IDImageError:
    claimed = f" ({size[0]}x{size[1]})" if size else ""
    return IDImageError(
        f"{label}: the image is too large{claimed}, the limit is {max_pixels / 1e6:g} megapixels; "
        "resize it (a face photo needs no more than about 2000x2000)"
    )


def _to_rgb(image: Image.Image, label: str, keep_alpha: bool = False) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB without clipping high-bit-depth data or blackening transparency."""
    mode = image.mode
    if keep_alpha and (mode in _ALPHA_MODES or "transparency" in image.info):
        return image.convert("RGBA")
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_high_depth_to_uint8(np.asarray(image))).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise IDImageError(f"{label}: unsupported colour mode {mode!r} ({exc}); {_FIX_FORMAT}") from None


def _high_depth_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Scale 16/32-bit integer or float grey levels to 0..255.

    16-bit data (PIL modes ``I;16*``, and mode ``I`` holding values above 255, as 16-bit PNGs decode to)
    is divided by 257 so that 65535 maps to 255; float data in [0, 1] is multiplied by 255.
    """
    values = pixels.astype(np.float64)
    if np.issubdtype(pixels.dtype, np.floating):
        scale = 255.0 if values.max(initial=0.0) <= 1.0 else 1.0
    else:
        scale = 1.0 / 257.0 if (pixels.dtype == np.uint16 or values.max(initial=0.0) > 255) else 1.0
    return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)


def _from_array(
    array: np.ndarray, label: str, max_pixels: int, *, channels_first: bool, keep_alpha: bool = False
) -> Image.Image:
    """Build an RGB image from an HxW / HxWxC (or, for tensors, CxHxW) array after validating it."""
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3 and channels_first and array.shape[0] in (1, 3, 4) and array.shape[2] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        expected = "[3,H,W] or [H,W,3]" if channels_first else "HxW, HxWx3 or HxWx4"
        raise IDImageError(f"{label}: unexpected shape {tuple(array.shape)}; expected {expected}")
    height, width = array.shape[:2]
    _check_pixel_count((width, height), label, max_pixels)
    array = _array_to_uint8(array, label)
    image = Image.fromarray(array)
    return _to_rgb(image, label, keep_alpha)


def _array_to_uint8(array: np.ndarray, label: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype == np.uint16:
        return _high_depth_to_uint8(array)
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        values = array.astype(np.float32)
        if not np.isfinite(values).all():
            raise IDImageError(f"{label}: the array contains NaN or infinite values")
        low, high = float(values.min()), float(values.max())
        tolerance = 1e-3  # rounding noise from float16/bfloat16 pipelines
        if low < -tolerance or high > 1.0 + tolerance:
            raise IDImageError(
                f"{label}: float pixel values must lie in [0, 1] (found {low:.3g}..{high:.3g}); "
                "divide 0..255 data by 255 or pass a uint8 array"
            )
        return np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise IDImageError(f"{label}: unsupported pixel type {array.dtype}; use uint8, or float in [0, 1]")


def _is_torch_tensor(obj: object) -> bool:
    """True for a torch tensor; never imports torch (if torch is not loaded, nothing can be a tensor)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def _tensor_to_numpy(tensor: Any) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():
        tensor = tensor.float()
    return tensor.numpy()


def _pil_label(image: Image.Image) -> str:
    filename = getattr(image, "filename", "")
    return str(filename) if filename else "the image"


def _file_label(handle: Any) -> str:
    filename = getattr(handle, "name", None)
    return str(filename) if isinstance(filename, (str, os.PathLike)) else "the uploaded file"


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.1f}"


def photo_label(index: int, name: str | None, noun: str = "photo") -> str:
    """How messages refer to a photo: "photo 2 (beach.jpg)", 1-based as users count."""
    return f"{noun} {index + 1} ({name})" if name else f"{noun} {index + 1}"
