"""images.load_image: every refusal names the photo, every odd-but-valid mode comes out as correct RGB."""

from __future__ import annotations

import io
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from photomaker.errors import IDImageError
from photomaker.images import MAX_IMAGE_PIXELS, load_image

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    body = kind + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))


def _png_header_only(width: int, height: int) -> bytes:
    """A 100-byte PNG whose header claims width x height, followed by a few bytes of pixel data only."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(bytes(64))
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _gradient(width: int = 40, height: int = 30) -> np.ndarray:
    """An RGB test pattern whose corners differ, so rotations and flips are detectable."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs * 255 // (width - 1), ys * 255 // (height - 1), np.full_like(xs, 60)], axis=-1).astype(np.uint8)


# ---------------------------------------------------------------- refusals


def test_empty_file_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(IDImageError, match=r"empty\.jpg.*empty"):
        load_image(path)


def test_text_file_named_jpg_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a photo\n")
    with pytest.raises(IDImageError, match=r"notes\.jpg: not a readable image"):
        load_image(path)


def test_missing_file_and_folder_are_refused(tmp_path: Path) -> None:
    with pytest.raises(IDImageError, match="missing.png: file not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(IDImageError, match="folder"):
        load_image(tmp_path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_data_is_refused(fmt: str) -> None:
    data = _encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 120, 3), np.uint8)), fmt)
    with pytest.raises(IDImageError, match="photo 3.*truncated or corrupt"):
        load_image(data[: len(data) // 2], name="photo 3")


def test_too_many_bytes_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(_encode(Image.fromarray(_gradient()), "PNG"))
    with pytest.raises(IDImageError, match=r"big\.png: the file is too large"):
        load_image(path, max_bytes=100)
    with pytest.raises(IDImageError, match="too large"):
        load_image(io.BytesIO(path.read_bytes()), max_bytes=100)


def test_pixel_limit_is_checked_on_the_header_before_decoding() -> None:
    # 8000x8000 is below PIL's own bomb limit, so only our header check can refuse it; without the check the
    # missing pixel data would surface as a "truncated" error instead.
    header = _png_header_only(8000, 8000)
    with pytest.raises(IDImageError, match=r"too large \(8000x8000\).*40 megapixels"):
        load_image(header, name="huge.png")
    with pytest.raises(IDImageError, match="huge.png: the image is too large"):
        load_image(_png_header_only(100_000, 100_000), name="huge.png")


def test_pixel_limit_is_overridable() -> None:
    image = Image.fromarray(_gradient(40, 30))
    with pytest.raises(IDImageError, match="too large"):
        load_image(image, max_pixels=40 * 30 - 1)
    assert load_image(image, max_pixels=40 * 30).size == (40, 30)
    assert MAX_IMAGE_PIXELS >= 4096 * 4096


@pytest.mark.parametrize(
    "source",
    [np.zeros((0, 10, 3), np.uint8), Image.new("RGB", (0, 0))],
    ids=["array", "pil"],
)
def test_zero_size_is_refused(source: object) -> None:
    with pytest.raises(IDImageError, match="zero size"):
        load_image(source)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.full((4, 4, 3), 2.0, np.float32), r"\[0, 1\]"),
        (np.full((4, 4, 3), np.nan, np.float32), "NaN"),
        (np.zeros((4, 4, 2), np.uint8), "unexpected shape"),
        (np.zeros((4, 4, 3), np.complex64), "unsupported pixel type"),
    ],
)
def test_bad_arrays_are_refused(array: np.ndarray, message: str) -> None:
    with pytest.raises(IDImageError, match=message):
        load_image(array)


def test_unknown_object_is_refused() -> None:
    with pytest.raises(IDImageError, match="cannot use an object of type int"):
        load_image(42)


def test_text_mode_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("x")
    with path.open("r") as handle, pytest.raises(IDImageError, match="text mode"):
        load_image(handle)


# ---------------------------------------------------------------- valid sources and modes


def test_example_portraits_load_from_path_bytes_file_and_pil() -> None:
    path = EXAMPLES / "grace_hopper.jpg"
    from_path = load_image(path)
    assert from_path.mode == "RGB" and from_path.size == (512, 600)
    for other in (path.read_bytes(), io.BytesIO(path.read_bytes()), Image.open(path), str(path)):
        assert np.array_equal(np.asarray(load_image(other)), np.asarray(from_path))


def test_grayscale_becomes_three_equal_channels() -> None:
    grey = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16))
    rgb = np.asarray(load_image(_encode(grey, "PNG")))
    assert rgb.shape == (16, 16, 3)
    assert np.array_equal(rgb[..., 0], np.arange(256).reshape(16, 16))
    assert np.array_equal(rgb[..., 0], rgb[..., 2])


def test_16_bit_png_is_scaled_not_clipped() -> None:
    levels = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    data = _encode(Image.fromarray(levels), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    rgb = np.asarray(load_image(data))
    # PIL's own convert("RGB") would clip 1000 and 32768 to 255.
    assert rgb[0, :, 0].tolist() == [0, 4, 128, 255]


def test_cmyk_jpeg_becomes_rgb() -> None:
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    rgb = np.asarray(load_image(_encode(cmyk, "JPEG", quality=95)))
    assert rgb.shape == (8, 8, 3)
    red, green, blue = rgb[4, 4].astype(int)
    assert red > 200 and green < 60 and blue < 60


def test_transparent_png_is_composited_on_white() -> None:
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # red everywhere ...
    rgba[:2, :, 3] = 255  # ... opaque in the top half, fully transparent in the bottom half
    rgb = np.asarray(load_image(_encode(Image.fromarray(rgba), "PNG")))
    assert rgb[0, 0].tolist() == [255, 0, 0]
    assert rgb[3, 3].tolist() == [255, 255, 255]


def test_grey_with_alpha_and_palette_with_transparency() -> None:
    la = Image.fromarray(np.stack([np.zeros((4, 4), np.uint8), np.full((4, 4), 0, np.uint8)], axis=-1), "LA")
    assert np.asarray(load_image(_encode(la, "PNG")))[0, 0].tolist() == [255, 255, 255]
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((0, 0), 0)
    rgb = np.asarray(load_image(_encode(palette, "GIF", transparency=0)))
    assert rgb[0, 0].tolist() == [255, 255, 255]  # transparent index
    assert rgb[1, 1].tolist() == [0, 0, 255]


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_image_uses_first_frame_and_says_so(fmt: str, caplog: pytest.LogCaptureFixture) -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    buffer = io.BytesIO()
    frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:], duration=100, lossless=True)
    with caplog.at_level(logging.INFO, logger="photomaker.images"):
        rgb = np.asarray(load_image(buffer.getvalue(), name="anim"))
    red, green, blue = rgb[4, 4].astype(int)
    assert red > 200 and green < 40 and blue < 40
    assert "anim: animated image with 3 frames; using the first frame" in caplog.text


def test_exif_orientation_is_applied() -> None:
    pattern = _gradient(40, 30)
    image = Image.fromarray(pattern)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = _encode(image, "PNG", exif=exif)
    upright = np.asarray(load_image(data))
    assert upright.shape == (40, 30, 3)
    assert np.array_equal(upright, np.rot90(pattern, k=-1))


def test_numpy_arrays_of_each_layout() -> None:
    pattern = _gradient()
    assert np.array_equal(np.asarray(load_image(pattern)), pattern)
    as_float = pattern.astype(np.float32) / 255.0
    assert np.array_equal(np.asarray(load_image(as_float)), pattern)
    grey = np.asarray(load_image(pattern[..., 0]))
    assert np.array_equal(grey[..., 1], pattern[..., 0])
    rgba = np.concatenate([pattern, np.full(pattern.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    assert np.array_equal(np.asarray(load_image(rgba)), pattern)


def test_torch_tensors_chw_and_hwc() -> None:
    torch = pytest.importorskip("torch")
    pattern = _gradient()
    hwc = torch.from_numpy(pattern.astype(np.float32) / 255.0)
    assert np.array_equal(np.asarray(load_image(hwc)), pattern)
    assert np.array_equal(np.asarray(load_image(hwc.permute(2, 0, 1))), pattern)
    assert np.array_equal(np.asarray(load_image(hwc.permute(2, 0, 1)[None].half())), pattern)
    with pytest.raises(IDImageError, match=r"the image tensor: float pixel values must lie in \[0, 1\]"):
        load_image(hwc * 255)
