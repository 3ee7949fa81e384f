"""Upload validation: sniffed type, byte and pixel limits, orientation, stripped metadata."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
from PIL import Image, ImageCms, ImageDraw, PngImagePlugin

from server.errors import AppError, ErrorCode
from server.media.images import MAX_BYTES, validate_image, validate_image_async

RED, BLUE = (255, 0, 0), (0, 0, 255)


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims `width`×`height` but whose pixel data is a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def refused(data: bytes) -> AppError:
    with pytest.raises(AppError) as caught:
        validate_image(data)
    return caught.value


class CountingExecutor(ThreadPoolExecutor):
    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self.submitted = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


@pytest.mark.parametrize(
    ("fmt", "mode", "content_type"),
    [("JPEG", "RGB", "image/jpeg"), ("PNG", "RGBA", "image/png"), ("WEBP", "RGBA", "image/webp")],
)
def test_jpeg_png_and_webp_are_accepted_with_their_type_and_size(
    fmt: str, mode: str, content_type: str
) -> None:
    image = validate_image(encode(Image.new(mode, (64, 48), (10, 200, 30)), fmt))
    assert (image.content_type, image.width, image.height) == (content_type, 64, 48)
    assert image.bytes == len(image.data)
    assert image.extension == content_type.split("/")[1].replace("jpeg", "jpg")
    with Image.open(io.BytesIO(image.data)) as reread:
        assert reread.format == fmt and reread.size == (64, 48)


@pytest.mark.parametrize(
    "data",
    [
        encode(Image.new("RGB", (8, 8)), "GIF"),
        encode(Image.new("RGB", (8, 8)), "BMP"),
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        b"",
        b"just text, named photo.png",
    ],
)
def test_anything_but_jpeg_png_or_webp_bytes_is_unsupported_media_type(data: bytes) -> None:
    assert refused(data).code == ErrorCode.UNSUPPORTED_MEDIA_TYPE


def test_more_than_10_mib_is_payload_too_large() -> None:
    error = refused(b"\xff\xd8\xff" + b"\0" * MAX_BYTES)
    assert error.code == ErrorCode.PAYLOAD_TOO_LARGE
    assert error.details == {"max_bytes": MAX_BYTES}


@pytest.mark.parametrize(
    ("width", "height"),
    [(8000, 6000), (10_000, 10_000), (40_000, 40_000)],
    ids=["48 MP", "100 MP, Pillow's warning range", "1600 MP, Pillow's error range"],
)
def test_too_many_pixels_are_refused_from_the_header_before_any_decoding(width: int, height: int) -> None:
    # The pixel data is truncated: decoding would fail with 415, so a 413 proves the header check came first.
    error = refused(png_header_only(width, height))
    assert error.code == ErrorCode.PAYLOAD_TOO_LARGE
    assert "40 megapixels" in error.message


@pytest.mark.parametrize(
    "data",
    [
        encode(Image.new("RGB", (300, 200), RED), "JPEG")[:400],
        encode(Image.new("RGB", (300, 200), RED), "PNG")[:-30],
        png_header_only(64, 64),
        b"\x89PNG\r\n\x1a\n" + b"\0" * 64,
        b"RIFF\0\0\0\0WEBPVP8 garbage",
    ],
    ids=["truncated jpeg", "truncated png", "png without pixels", "png magic then zeros", "corrupt webp"],
)
def test_corrupt_or_truncated_images_are_unsupported_media_type(data: bytes) -> None:
    assert refused(data).code == ErrorCode.UNSUPPORTED_MEDIA_TYPE


def test_the_exif_orientation_is_applied_to_the_pixels() -> None:
    source = Image.new("RGB", (40, 20), RED)
    ImageDraw.Draw(source).rectangle((20, 0, 39, 19), fill=BLUE)  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90° clockwise
    image = validate_image(encode(source, "JPEG", exif=exif, quality=95))
    assert (image.width, image.height) == (20, 40)
    with Image.open(io.BytesIO(image.data)) as upright:
        top, bottom = upright.convert("RGB").getpixel((10, 5)), upright.convert("RGB").getpixel((10, 35))
        assert isinstance(top, tuple) and isinstance(bottom, tuple)
        assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]
        assert 0x0112 not in upright.getexif()


def test_exif_xmp_and_comments_are_stripped_but_the_colour_profile_is_kept() -> None:
    exif = Image.Exif()
    exif[0x010F] = "SpyCam"  # Make
    exif[0x0132] = "2026:01:01 10:00:00"  # DateTime
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = encode(
        Image.new("RGB", (32, 32), RED),
        "JPEG",
        exif=exif,
        icc_profile=icc,
        comment=b"secret",
        xmp=b"<x:xmpmeta/>",
    )
    with Image.open(io.BytesIO(validate_image(data).data)) as clean:
        assert len(clean.getexif()) == 0
        assert not {"exif", "xmp", "comment"} & set(clean.info)
        assert clean.info.get("icc_profile") == icc


def test_png_text_chunks_are_stripped() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "someone")
    info.add_itxt("GPS", "31.2,121.5")
    data = encode(Image.new("RGB", (16, 16), BLUE), "PNG", pnginfo=info)
    with Image.open(io.BytesIO(validate_image(data).data)) as clean:
        assert not {"Author", "GPS"} & set(clean.info)


async def test_validation_runs_in_the_executor_it_is_given() -> None:
    with CountingExecutor() as executor:
        image = await validate_image_async(encode(Image.new("RGB", (10, 10)), "PNG"), executor)
        assert executor.submitted == 1
    assert image.content_type == "image/png"


async def test_an_oversized_upload_is_refused_without_occupying_a_worker() -> None:
    with CountingExecutor() as executor:
        with pytest.raises(AppError) as caught:
            await validate_image_async(b"\x89PNG\r\n\x1a\n" + b"\0" * MAX_BYTES, executor)
        assert executor.submitted == 0
    assert caught.value.code == ErrorCode.PAYLOAD_TOO_LARGE


def test_a_cmyk_jpeg_becomes_rgb_without_a_profile_that_no_longer_fits() -> None:
    data = encode(Image.new("CMYK", (20, 20), (0, 255, 255, 0)), "JPEG", icc_profile=b"pretend CMYK profile")
    with Image.open(io.BytesIO(validate_image(data).data)) as clean:
        assert clean.mode == "RGB"
        assert "icc_profile" not in clean.info
        assert clean.getpixel((5, 5)) == pytest.approx((255, 0, 0), abs=3)
