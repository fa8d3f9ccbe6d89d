"""The image loader on real files of every awkward kind, made in tmp_path."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from medcap_helpers.images import (
    ImageLoadError,
    inspect_image,
    load_image,
    load_image_bytes,
    to_rgb8,
    use_pixel_limit,
)


def _save(image: Image.Image, path: Path, **kwargs: object) -> Path:
    image.save(path, **kwargs)
    return path


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def test_8bit_grey_becomes_rgb_with_same_values(tmp_path: Path) -> None:
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = load_image(_save(Image.fromarray(grey), tmp_path / "grey.png"))
    assert image.mode == "RGB" and image.size == (16, 16)
    assert (_pixels(image)[..., 0] == grey).all() and (_pixels(image)[..., 2] == grey).all()


def test_16bit_grey_is_scaled_by_its_bit_range_not_clipped(tmp_path: Path) -> None:
    twelve_bit = np.array([[0, 1024, 2048, 4095]], dtype=np.uint16).repeat(4, axis=0)
    path = _save(Image.fromarray(twelve_bit), tmp_path / "12bit_in_16.png")
    assert Image.open(path).mode.startswith("I")
    image = load_image(path)
    row = _pixels(image)[0, :, 0]
    assert image.mode == "RGB"
    assert row.tolist() == [0, 64, 128, 255]  # x * 255 / 4095, rounded: the 12-bit range fills 8 bits
    full = np.array([[0, 32768, 65535]], dtype=np.uint16)
    row16 = _pixels(load_image(_save(Image.fromarray(full), tmp_path / "16bit.png")))[0, :, 0]
    assert row16.tolist() == [0, 128, 255]
    assert _pixels(Image.open(path).convert("RGB"))[0, 1, 0] == 255  # what plain PIL would have done


def test_rgba_is_composited_on_black(tmp_path: Path) -> None:
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 255, 255, 0)      # fully transparent white -> black
    rgba[0, 1] = (200, 100, 50, 255)     # opaque -> unchanged
    rgba[1, 0] = (200, 200, 200, 128)    # half transparent -> about half as bright
    image = load_image(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "alpha.png"))
    pixels = _pixels(image)
    assert image.mode == "RGB"
    assert pixels[0, 0].tolist() == [0, 0, 0]
    assert pixels[0, 1].tolist() == [200, 100, 50]
    assert 95 <= pixels[1, 0, 0] <= 105
    grey_alpha = Image.fromarray(rgba[..., [0, 3]].copy(), "LA")
    assert _pixels(load_image(_save(grey_alpha, tmp_path / "la.png")))[0, 0].tolist() == [0, 0, 0]


def test_palette_images(tmp_path: Path) -> None:
    palette = Image.new("P", (4, 4))
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.putpixel((1, 1), 1)
    image = load_image(_save(palette, tmp_path / "palette.png"))
    assert image.mode == "RGB" and _pixels(image)[1, 1].tolist() == [10, 200, 30]
    palette.info["transparency"] = 1
    transparent = load_image(_save(palette, tmp_path / "palette_t.png", transparency=1))
    assert _pixels(transparent)[1, 1].tolist() == [0, 0, 0]


def test_cmyk_jpeg(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    path = _save(cmyk, tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(path).mode == "CMYK"
    red, green, blue = _pixels(load_image(path))[4, 4].tolist()
    assert red > 200 and green < 60 and blue < 60


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    wide = np.zeros((10, 30), dtype=np.uint8)
    wide[:, :5] = 255                               # bright band on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6                                # "rotate 90 CW to display"
    path = _save(Image.fromarray(wide), tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    image = load_image(path)
    assert image.size == (10, 30)                   # displayed upright: portrait
    assert _pixels(image)[:5, :, 0].mean() > 200    # the band is now at the top
    assert _pixels(image)[-5:, :, 0].mean() < 50


def test_zero_bytes_text_and_truncated_files_are_rejected_by_name(tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("this is not a radiograph")
    noise = np.random.default_rng(0).integers(0, 255, (256, 256), dtype=np.uint8)
    whole = _save(Image.fromarray(noise), tmp_path / "whole.png").read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(whole[: len(whole) // 2])
    for path, reason in ((empty, "empty"), (text, "not an image"), (truncated, "truncated")):
        with pytest.raises(ImageLoadError, match=path.name) as info:
            load_image(path)
        assert reason in str(info.value)
        with pytest.raises(ImageLoadError, match=path.name):
            inspect_image(path)
    with pytest.raises(ImageLoadError, match="cannot read"):
        load_image(tmp_path / "absent.png")
    assert isinstance(ImageLoadError("x"), ValueError)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_damage_inside_the_data_is_found_by_a_full_decode(tmp_path: Path) -> None:
    noise = np.random.default_rng(1).integers(0, 255, (128, 128), dtype=np.uint8)
    data = bytearray(_save(Image.fromarray(noise), tmp_path / "ok.png").read_bytes())
    middle = len(data) // 2
    data[middle:middle + 200] = bytes(200)           # corrupt compressed data, keep the IEND trailer
    damaged = tmp_path / "damaged.png"
    damaged.write_bytes(bytes(data))
    inspect_image(damaged)                           # the cheap check cannot see it...
    with pytest.raises(ImageLoadError, match="damaged.png"):
        load_image(damaged)                          # ...a full decode does


def test_pixel_limit_is_checked_on_the_header_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(Image.new("L", (2000, 1500)), tmp_path / "big.png")

    def no_decoding(self: object) -> None:
        raise AssertionError("the image was decoded before its size was checked")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageLoadError, match=r"big.png: 2000x1500 = 3,000,000 pixels"):
        load_image(path, max_pixels=1_000_000)
    with pytest.raises(ImageLoadError, match="max_image_pixels"):
        inspect_image(path, max_pixels=1_000_000)
    with pytest.raises(ImageLoadError, match="upload.png"):
        load_image_bytes(path.read_bytes(), "upload.png", max_pixels=1_000_000)


def test_one_pixel_limit_whatever_pillows_own_guard_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """max_pixels is the limit, with one message: Pillow's guard neither refuses an image below it nor
    answers first with its own number (89,478,485 by default)."""
    path = _save(Image.new("L", (100, 100)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4_000)  # PIL alone would refuse 10,000 pixels
    assert load_image(path, max_pixels=10**9).size == (100, 100)
    with pytest.raises(ImageLoadError, match=r"^bomb.png: 100x100 = 10,000 pixels is more than the limit of 5,000 "):
        load_image_bytes(path.read_bytes(), "bomb.png", max_pixels=5_000)
    assert Image.MAX_IMAGE_PIXELS == 4_000  # restored after the header was read

    monkeypatch.undo()
    huge = _save(Image.new("1", (12_000, 12_000)), tmp_path / "huge.png")  # 144 M pixels, over Pillow's 2x guard
    with pytest.raises(ImageLoadError) as raised:
        load_image(huge, max_pixels=50_000_000)
    assert "12000x12000 = 144,000,000 pixels is more than the limit of 50,000,000 pixels" in str(raised.value)
    assert "89,478,485" not in str(raised.value) and "89478485" not in str(raised.value)


def test_use_pixel_limit_sets_pillows_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    use_pixel_limit(1234)
    assert Image.MAX_IMAGE_PIXELS == 1234


def test_load_image_bytes_for_uploads(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (5, 7), (1, 2, 3)).save(buffer, format="PNG")
    image = load_image_bytes(buffer.getvalue(), "upload.png")
    assert image.mode == "RGB" and image.size == (5, 7) and image.getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(ImageLoadError, match="upload.png: the file is empty"):
        load_image_bytes(b"", "upload.png")
    with pytest.raises(ImageLoadError, match="notes.txt: not an image"):
        load_image_bytes(b"hello", "notes.txt")


def test_inspect_image_reports_modes_that_plain_conversion_would_spoil(tmp_path: Path) -> None:
    def info(image: Image.Image, name: str, **kw: object) -> bool:
        return inspect_image(_save(image, tmp_path / name, **kw)).converts_natively

    assert info(Image.new("L", (4, 4)), "l.png")
    assert info(Image.new("RGB", (4, 4)), "rgb.png")
    assert info(Image.new("CMYK", (4, 4)), "cmyk.jpg")
    assert not info(Image.fromarray(np.zeros((4, 4), np.uint16)), "i16.png")
    assert not info(Image.new("RGBA", (4, 4)), "rgba.png")
    assert not info(Image.new("P", (4, 4)), "p_t.png", transparency=0)
    header = inspect_image(tmp_path / "l.png")
    assert (header.width, header.height, header.mode, header.format) == (4, 4, "L", "PNG")


def test_to_rgb8_float_and_32bit() -> None:
    floats = Image.fromarray(np.array([[0.5, 1.5, 2.5]], dtype=np.float32))
    assert _pixels(to_rgb8(floats))[0, :, 0].tolist() == [0, 128, 255]
    signed = Image.fromarray(np.array([[-100, 0, 155]], dtype=np.int32))
    assert _pixels(to_rgb8(signed))[0, :, 0].tolist() == [0, 100, 255]
