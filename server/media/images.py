"""Validating uploaded images: type, size, pixel count, orientation, metadata.

`validate_image` is CPU work (tens of milliseconds for a phone photo): handlers call
`validate_image_async` with an executor so the event loop never decodes pixels.

Rules, in the order they are checked:

1. At most `MAX_BYTES` (10 MiB) → otherwise PAYLOAD_TOO_LARGE (413).
2. The type is sniffed from the magic numbers, never from a file name or a client's
   Content-Type: JPEG, PNG or WebP → otherwise UNSUPPORTED_MEDIA_TYPE (415).
3. At most `MAX_PIXELS` (40 megapixels), read from the header before any pixel is
   decoded → otherwise PAYLOAD_TOO_LARGE (413). Pillow's own decompression-bomb guard
   (`Image.MAX_IMAGE_PIXELS`, a process-wide global we leave at its default) fires
   only above our limit; its error and its warning are both turned into the same 413,
   so warnings-as-errors in tests and a logged warning in production behave alike.
4. Pixels are decoded. Corrupt or truncated data is UNSUPPORTED_MEDIA_TYPE (415), the
   same code as a wrong type: to the client both mean "these bytes are not an image we
   accept", and neither is fixed by changing a field.
5. The EXIF orientation is applied to the pixels, then the image is re-encoded in its
   own format with no metadata: no EXIF (GPS, camera, time), no XMP, no text chunks.
   The ICC colour profile is kept so colours do not shift. Animated WebP/PNG keep only
   their first frame.
"""

from __future__ import annotations

import asyncio
import io
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Final

from PIL import Image, ImageOps, UnidentifiedImageError

from server.errors import AppError, ErrorCode

MAX_BYTES: Final = 10 * 1024 * 1024
MAX_PIXELS: Final = 40_000_000
JPEG_QUALITY: Final = 90
WEBP_QUALITY: Final = 90

# Pillow format name → content type. Only these are accepted.
CONTENT_TYPES: Final[dict[str, str]] = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
EXTENSIONS: Final[dict[str, str]] = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True, slots=True)
class ValidatedImage:
    """A clean image, ready to store: `data` is what to write, `bytes` is len(data)
    (named as in the API's asset answer)."""

    data: bytes
    content_type: str
    width: int
    height: int
    bytes: int

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.content_type]


def sniff_format(data: bytes) -> str | None:
    """The Pillow format name the magic numbers announce ("JPEG", "PNG", "WEBP"), or None."""
    if data.startswith(_PNG_MAGIC):
        return "PNG"
    if data.startswith(_JPEG_MAGIC):
        return "JPEG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _unsupported(message: str) -> AppError:
    return AppError(
        ErrorCode.UNSUPPORTED_MEDIA_TYPE,
        message,
        details={"accepted": sorted(CONTENT_TYPES.values())},
    )


def _too_many_bytes(size: int, max_bytes: int) -> AppError:
    return AppError(
        ErrorCode.PAYLOAD_TOO_LARGE,
        f"The image is {size} bytes; at most {max_bytes // (1024 * 1024)} MiB ({max_bytes} bytes) "
        "are accepted",
        details={"max_bytes": max_bytes},
    )


def _too_many_pixels(width: int | None, height: int | None, max_pixels: int) -> AppError:
    declared = f"{width}×{height} pixels" if width and height else "far more pixels than allowed"
    return AppError(
        ErrorCode.PAYLOAD_TOO_LARGE,
        f"The image header declares {declared}; at most {max_pixels // 1_000_000} megapixels are "
        "accepted (checked before decoding, to refuse decompression bombs)",
        details={"max_pixels": max_pixels},
    )


def open_checked(data: bytes, fmt: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open `data` (header only) as `fmt` and refuse it if it has too many pixels.

    Raises AppError. Shared with the local vendor, which opens stored images the same way.
    """
    try:
        image = Image.open(io.BytesIO(data), formats=[fmt])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_many_pixels(None, None, max_pixels) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise _unsupported(f"The file is not a readable {fmt} image: {exc}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        image.close()
        raise _unsupported(f"The {fmt} header declares an empty image")
    if width * height > max_pixels:
        image.close()
        raise _too_many_pixels(width, height, max_pixels)
    return image


def _decode(image: Image.Image, fmt: str) -> Image.Image:
    """Decode every pixel and apply the EXIF orientation (a new image without metadata)."""
    try:
        image.load()
        upright = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _unsupported(f"The {fmt} image is corrupt or truncated: {exc}") from None
    icc = image.info.get("icc_profile")
    upright.info = {"icc_profile": icc} if isinstance(icc, bytes) and icc else {}
    return upright


def _encode(image: Image.Image, fmt: str) -> bytes:
    icc = image.info.get("icc_profile")
    options: dict[str, object] = {}
    if fmt == "JPEG":
        target = image.mode if image.mode in ("RGB", "L") else "RGB"
        options.update(quality=JPEG_QUALITY, optimize=True)
    elif fmt == "WEBP":
        target = (
            image.mode if image.mode in ("RGB", "RGBA") else ("RGBA" if "A" in image.getbands() else "RGB")
        )
        options.update(quality=WEBP_QUALITY, method=4)
    else:
        target = image.mode
        options.update(optimize=False, compress_level=6)
    if target != image.mode:
        image = image.convert(target)  # e.g. CMYK: its profile no longer describes the pixels
    elif icc:
        options["icc_profile"] = icc
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def validate_image(
    data: bytes, *, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS
) -> ValidatedImage:
    """Check an upload and return it upright and stripped of metadata, or raise AppError."""
    if len(data) > max_bytes:
        raise _too_many_bytes(len(data), max_bytes)
    fmt = sniff_format(data)
    if fmt is None:
        raise _unsupported("Only JPEG, PNG and WebP images are accepted")
    with open_checked(data, fmt, max_pixels) as opened:
        upright = _decode(opened, fmt)
    with upright:
        width, height = upright.size
        clean = _encode(upright, fmt)
    return ValidatedImage(
        data=clean, content_type=CONTENT_TYPES[fmt], width=width, height=height, bytes=len(clean)
    )


async def validate_image_async(
    data: bytes,
    executor: Executor | None,
    *,
    max_bytes: int = MAX_BYTES,
    max_pixels: int = MAX_PIXELS,
) -> ValidatedImage:
    """`validate_image` on `executor` (None: the loop's default executor).

    The size check runs first on the loop so an oversized body never occupies a worker.
    """
    if len(data) > max_bytes:
        raise _too_many_bytes(len(data), max_bytes)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(
        executor, lambda: validate_image(data, max_bytes=max_bytes, max_pixels=max_pixels)
    )
