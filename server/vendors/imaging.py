"""Pillow helpers shared by the local vendor's operations: decode, encode, colour-key matte.

Sync and CPU-only; errors are ValueError with a message naming the input.
"""

from __future__ import annotations

import io
from typing import Final

from PIL import Image, ImageChops, ImageFilter, ImageOps

from server.errors import AppError
from server.media.images import MAX_PIXELS, open_checked, sniff_format

JPEG_QUALITY: Final = 90


def load_image(data: bytes, what: str) -> Image.Image:
    """Decode an input image (≤ 40 MP, EXIF orientation applied) as RGB or RGBA."""
    fmt = sniff_format(data) if isinstance(data, bytes) else None
    if fmt is None:
        raise ValueError(f"{what}: not a JPEG, PNG or WebP image")
    try:
        with open_checked(data, fmt) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except AppError as exc:
        raise ValueError(f"{what}: {exc.message}") from None
    except (OSError, SyntaxError, EOFError) as exc:
        raise ValueError(f"{what}: unreadable image ({exc})") from None
    transparent = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    return image.convert("RGBA" if transparent else "RGB")


def check_output_size(width: int, height: int, what: str) -> None:
    if width * height > MAX_PIXELS:
        raise ValueError(
            f"{what}: the result would be {width}×{height}, over {MAX_PIXELS // 1_000_000} megapixels"
        )


def encode(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    if fmt == "jpeg":
        if image.mode == "RGBA":
            flat = Image.new("RGB", image.size, (255, 255, 255))
            flat.paste(image, mask=image.getchannel("A"))
            image = flat
        image.convert("RGB").save(out, "JPEG", quality=JPEG_QUALITY)
    else:
        image.save(out, "PNG", compress_level=6)
    return out.getvalue()


def border_colour(rgb: Image.Image) -> tuple[int, int, int]:
    """The per-channel median of a band (2 % of the short side, ≥ 1 px) along the border."""
    w, h = rgb.size
    band = max(1, min(w, h) // 50)
    boxes = [(0, 0, w, band), (0, h - band, w, h), (0, band, band, h - band), (w - band, band, w, h - band)]
    hist = [0] * 768
    for box in boxes:
        if box[2] > box[0] and box[3] > box[1]:
            hist = [a + b for a, b in zip(hist, rgb.crop(box).histogram(), strict=True)]
    medians = []
    for channel in range(3):
        counts = hist[channel * 256 : (channel + 1) * 256]
        half, seen = sum(counts) / 2, 0
        for value, count in enumerate(counts):
            seen += count
            if seen >= half:
                medians.append(value)
                break
    return medians[0], medians[1], medians[2]


def colour_key_matte(image: Image.Image, tolerance: int, feather: float) -> Image.Image:
    """RGBA: pixels within `tolerance` (per channel) of the border colour made transparent."""
    rgb = image.convert("RGB")
    diff = ImageChops.difference(rgb, Image.new("RGB", rgb.size, border_colour(rgb)))
    r, g, b = diff.split()
    distance = ImageChops.lighter(ImageChops.lighter(r, g), b)
    # A short linear ramp above the tolerance avoids a jagged 0/255 edge.
    ramp = max(1, tolerance // 4)
    mask = distance.point(
        [0 if v <= tolerance else min(255, (v - tolerance) * 255 // ramp) for v in range(256)]
    )
    if feather > 0:
        # Shrink the subject by a pixel before blurring so the soft edge falls inside it
        # rather than as a halo of backdrop colour around it.
        mask = mask.filter(ImageFilter.MinFilter(3)).filter(ImageFilter.GaussianBlur(feather))
    if image.mode == "RGBA":
        mask = ImageChops.multiply(mask, image.getchannel("A"))
    out = rgb.convert("RGBA")
    out.putalpha(mask)
    return out
