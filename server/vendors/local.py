"""The built-in `local` vendor: real image work with Pillow. None of it is AI.

It exists so that every pipeline runs end to end on a laptop with no vendor account,
and so tests exercise real bytes. What each operation really does:

- `resize`, `crop`, `grid`, `watermark`: exactly what the names say.
- `matting`: colour-key background removal. The background colour is the median of a
  thin band along the border; pixels close to it become transparent and the mask's edge
  is feathered. It works on studio shots against a plain backdrop; it cannot separate a
  person from a busy scene, and interior areas of the backdrop colour vanish too.
- `tryon_compose`: pastes a (matted) garment over the torso region of a person photo,
  scaled to a fraction of the person's width. No pose, no warping, no cloth physics.
- `style`: named colour filters (mono, sepia, warm, cool, sketch, posterize, vivid).

Every function is sync and CPU-only, takes and returns image bytes (PNG by default,
JPEG on request; matting always PNG), and raises ValueError for a bad parameter or an
unreadable input. Callers run them in an executor. Outputs never exceed 40 megapixels.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps, features

from server.vendors import ImageInput, ImageInputs, OperationSpec, ParamSpec
from server.vendors.imaging import check_output_size, colour_key_matte, encode, load_image

MAX_SIDE: Final = 8192
STYLES: Final = ("mono", "sepia", "warm", "cool", "sketch", "posterize", "vivid")
CORNERS: Final = ("bottom-right", "bottom-left", "top-right", "top-left")
_Op = TypeVar("_Op", bound=Callable[..., bytes])


@dataclass(frozen=True, slots=True)
class OperationResult:
    data: bytes
    content_type: str
    width: int
    height: int


# --- registry ------------------------------------------------------------------------------

OPERATIONS: dict[str, OperationSpec] = {}

_FORMAT = ParamSpec("choice", "png", choices=("png", "jpeg"), description="output encoding")
_TOLERANCE = ParamSpec("int", 48, minimum=0, maximum=255, description="max channel distance to the backdrop")
_FEATHER = ParamSpec("float", 1.5, minimum=0, maximum=20, description="edge blur radius in pixels")
_SIDE = ParamSpec("int", None, minimum=1, maximum=MAX_SIDE)
_OFFSET = ParamSpec("int", None, minimum=0, maximum=MAX_SIDE)
_FRACTION = ParamSpec("float", 1.0, minimum=0.0, maximum=1.0)
_IMAGE = (ImageInput("image"),)


def _operation(
    description: str,
    params: dict[str, ParamSpec],
    inputs: tuple[ImageInput, ...] = _IMAGE,
    fixed_output: str | None = None,
) -> Callable[[_Op], _Op]:
    """Register an operation; its image inputs are its positional arguments, in order."""

    def register(fn: _Op) -> _Op:
        OPERATIONS[fn.__name__] = OperationSpec(fn.__name__, description, inputs, params, fn, fixed_output)
        return fn

    return register


def _validated(op: str, **params: Any) -> dict[str, Any]:
    return OPERATIONS[op].validate_params(params)


# --- operations ----------------------------------------------------------------------------


@_operation(
    "Scale an image (fit inside, fill and crop, or stretch)",
    {
        "width": _SIDE,
        "height": _SIDE,
        "mode": ParamSpec("choice", "fit", choices=("fit", "fill", "stretch")),
        "format": _FORMAT,
    },
)
def resize(
    image: bytes,
    *,
    width: int | None = None,
    height: int | None = None,
    mode: str = "fit",
    format: str = "png",
) -> bytes:
    """Scale to `width`×`height`: fit inside (keep aspect), fill (crop to cover) or stretch.
    With one side given, the other follows the aspect ratio."""
    p = _validated("resize", width=width, height=height, mode=mode, format=format)
    if p["width"] is None and p["height"] is None:
        raise ValueError("resize: give width, height or both")
    im = load_image(image, "resize: image")
    w = p["width"] or max(1, round(im.width * p["height"] / im.height))
    h = p["height"] or max(1, round(im.height * p["width"] / im.width))
    check_output_size(w, h, "resize")
    if p["width"] is None or p["height"] is None or p["mode"] == "stretch":
        out = im.resize((w, h), Image.Resampling.LANCZOS)
    elif p["mode"] == "fill":
        out = ImageOps.fit(im, (w, h), Image.Resampling.LANCZOS)
    else:
        out = ImageOps.contain(im, (w, h), Image.Resampling.LANCZOS)
    return encode(out, p["format"])


@_operation(
    "Cut out a box, or the largest centred box of an aspect ratio",
    {
        "left": _OFFSET,
        "top": _OFFSET,
        "width": _SIDE,
        "height": _SIDE,
        "aspect": ParamSpec("str", None, max_length=11, description='e.g. "3:4"'),
        "format": _FORMAT,
    },
)
def crop(
    image: bytes,
    *,
    left: int | None = None,
    top: int | None = None,
    width: int | None = None,
    height: int | None = None,
    aspect: str | None = None,
    format: str = "png",
) -> bytes:
    """Cut out the box `left`,`top`,`width`,`height`, or the largest centred box of `aspect` ("3:4")."""
    p = _validated("crop", left=left, top=top, width=width, height=height, aspect=aspect, format=format)
    box_given = [p[k] is not None for k in ("left", "top", "width", "height")]
    if (p["aspect"] is None) == (not any(box_given)) or (any(box_given) and not all(box_given)):
        raise ValueError("crop: give either all of left, top, width, height, or aspect alone")
    im = load_image(image, "crop: image")
    if p["aspect"] is not None:
        try:
            aw, ah = (int(part) for part in p["aspect"].split(":"))
        except ValueError:
            raise ValueError(f"crop: aspect must look like 3:4, got {p['aspect']!r}") from None
        if aw <= 0 or ah <= 0:
            raise ValueError("crop: aspect sides must be positive")
        w = min(im.width, im.height * aw // ah) or 1
        h = min(im.height, w * ah // aw) or 1
        box = ((im.width - w) // 2, (im.height - h) // 2, (im.width - w) // 2 + w, (im.height - h) // 2 + h)
    else:
        box = (p["left"], p["top"], p["left"] + p["width"], p["top"] + p["height"])
        if box[2] > im.width or box[3] > im.height:
            raise ValueError(f"crop: the box {box} lies outside the {im.width}×{im.height} image")
    return encode(im.crop(box), p["format"])


@_operation(
    "Remove a plain backdrop by colour key (not AI)",
    {"tolerance": _TOLERANCE, "feather": _FEATHER},
    fixed_output="image/png",
)
def matting(image: bytes, *, tolerance: int = 48, feather: float = 1.5) -> bytes:
    """Colour-key background removal (not AI): an RGBA PNG with the backdrop transparent."""
    p = _validated("matting", tolerance=tolerance, feather=feather)
    return encode(colour_key_matte(load_image(image, "matting: image"), p["tolerance"], p["feather"]), "png")


@_operation(
    "Paste a garment over a person's torso (not AI)",
    {
        "scale": ParamSpec(
            "float", 0.45, minimum=0.05, maximum=1.0, description="garment width / person width"
        ),
        "top": ParamSpec("float", 0.25, minimum=0.0, maximum=0.95, description="garment top / person height"),
        "offset_x": ParamSpec("float", 0.0, minimum=-0.5, maximum=0.5),
        "matte": ParamSpec("choice", "auto", choices=("auto", "always", "never")),
        "tolerance": _TOLERANCE,
        "feather": _FEATHER,
        "format": _FORMAT,
    },
    inputs=(ImageInput("person"), ImageInput("garment")),
)
def tryon_compose(
    person: bytes,
    garment: bytes,
    *,
    scale: float = 0.45,
    top: float = 0.25,
    offset_x: float = 0.0,
    matte: str = "auto",
    tolerance: int = 48,
    feather: float = 1.5,
    format: str = "png",
) -> bytes:
    """Paste the garment over the torso: `scale` × the person's width, its top edge at `top`
    × the height, centred (shifted by `offset_x` × the width). `matte`: auto (matte unless the
    garment already has transparency), always, never. The result has the person's size."""
    p = _validated(
        "tryon_compose",
        scale=scale,
        top=top,
        offset_x=offset_x,
        matte=matte,
        tolerance=tolerance,
        feather=feather,
        format=format,
    )
    base = load_image(person, "tryon_compose: person")
    cloth = load_image(garment, "tryon_compose: garment")
    opaque = cloth.getchannel("A").histogram()[255] if cloth.mode == "RGBA" else cloth.width * cloth.height
    has_alpha = opaque < cloth.width * cloth.height
    if p["matte"] == "always" or (p["matte"] == "auto" and not has_alpha):
        cloth = colour_key_matte(cloth, p["tolerance"], p["feather"])
    cloth = cloth.convert("RGBA")
    bbox = cloth.getchannel("A").getbbox()
    if bbox is None:
        raise ValueError("tryon_compose: nothing of the garment is left after matting")
    cloth = cloth.crop(bbox)
    y = round(base.height * p["top"])
    gw = max(1, round(base.width * p["scale"]))
    gh = max(1, round(cloth.height * gw / cloth.width))
    if gh > base.height - y:  # keep the whole garment inside the picture
        gh = max(1, base.height - y)
        gw = max(1, round(cloth.width * gh / cloth.height))
    cloth = cloth.resize((gw, gh), Image.Resampling.LANCZOS)
    x = round((base.width - gw) / 2 + p["offset_x"] * base.width)
    x = min(max(0, x), base.width - gw)
    out = base.convert("RGBA")
    out.alpha_composite(cloth, (x, y))
    return encode(out if base.mode == "RGBA" else out.convert("RGB"), p["format"])


@_operation(
    "A named colour filter",
    {
        "filter": ParamSpec("choice", None, required=True, choices=STYLES),
        "strength": _FRACTION,
        "format": _FORMAT,
    },
)
def style(image: bytes, *, filter: str, strength: float = 1.0, format: str = "png") -> bytes:
    """A named colour filter, blended with the original by `strength` (0–1)."""
    p = _validated("style", filter=filter, strength=strength, format=format)
    im = load_image(image, "style: image")
    alpha = im.getchannel("A") if im.mode == "RGBA" else None
    rgb = im.convert("RGB")
    name = p["filter"]
    if name == "mono":
        styled = ImageOps.grayscale(rgb).convert("RGB")
    elif name == "sepia":
        styled = ImageOps.colorize(ImageOps.grayscale(rgb), "#2b1d0e", "#f4e4c1")
    elif name in ("warm", "cool"):
        r, g, b = rgb.split()
        up = r.point(lambda v: min(255, round(v * 1.12 + 12)))
        down = b.point(lambda v: round(v * 0.82))
        if name == "cool":
            up, down = r.point(lambda v: round(v * 0.82)), b.point(lambda v: min(255, round(v * 1.12 + 12)))
        styled = Image.merge("RGB", (up, g, down))
    elif name == "sketch":
        gray = ImageOps.grayscale(rgb).filter(ImageFilter.SMOOTH_MORE)
        styled = ImageOps.autocontrast(gray.filter(ImageFilter.CONTOUR)).convert("RGB")
    elif name == "posterize":
        styled = ImageOps.posterize(rgb, 3)
    else:  # vivid
        styled = ImageEnhance.Contrast(ImageEnhance.Color(rgb).enhance(1.8)).enhance(1.15)
    out = Image.blend(rgb, styled, p["strength"])
    if alpha is not None:
        out.putalpha(alpha)
    return encode(out, p["format"])


@_operation(
    "Several images in one grid of square cells",
    {
        "columns": ParamSpec("int", None, minimum=1, maximum=16),
        "cell": ParamSpec("int", 512, minimum=16, maximum=2048),
        "gap": ParamSpec("int", 8, minimum=0, maximum=256),
        "background": ParamSpec("color", "#ffffff"),
        "format": _FORMAT,
    },
    inputs=(ImageInput("images", many=True, min_count=2, max_count=16),),
)
def grid(
    images: Sequence[bytes],
    *,
    columns: int | None = None,
    cell: int = 512,
    gap: int = 8,
    background: str = "#ffffff",
    format: str = "png",
) -> bytes:
    """Lay 2–16 images out in a grid of square cells (`columns` default: ⌈√n⌉), each fitted
    and centred in its cell, `gap` pixels apart and around."""
    p = _validated("grid", columns=columns, cell=cell, gap=gap, background=background, format=format)
    if not 2 <= len(images) <= 16:
        raise ValueError(f"grid: takes 2–16 images, got {len(images)}")
    cols = min(p["columns"] or math.ceil(math.sqrt(len(images))), len(images))
    rows = math.ceil(len(images) / cols)
    size, gap = p["cell"], p["gap"]
    width, height = cols * size + (cols + 1) * gap, rows * size + (rows + 1) * gap
    check_output_size(width, height, "grid")
    out = Image.new("RGB", (width, height), p["background"])
    for i, data in enumerate(images):
        tile = ImageOps.contain(
            load_image(data, f"grid: image {i + 1}"), (size, size), Image.Resampling.LANCZOS
        )
        x = gap + (i % cols) * (size + gap) + (size - tile.width) // 2
        y = gap + (i // cols) * (size + gap) + (size - tile.height) // 2
        out.paste(tile, (x, y), tile.getchannel("A") if tile.mode == "RGBA" else None)
    return encode(out, p["format"])


@_operation(
    "Text in a corner",
    {
        "text": ParamSpec("str", "Wardrobe", max_length=64),
        "position": ParamSpec("choice", "bottom-right", choices=CORNERS),
        "opacity": ParamSpec("float", 0.6, minimum=0.0, maximum=1.0),
        "size": ParamSpec("float", 0.05, minimum=0.01, maximum=0.3, description="text height / short side"),
        "color": ParamSpec("color", "#ffffff"),
        "format": _FORMAT,
    },
)
def watermark(
    image: bytes,
    *,
    text: str = "Wardrobe",
    position: str = "bottom-right",
    opacity: float = 0.6,
    size: float = 0.05,
    color: str = "#ffffff",
    format: str = "png",
) -> bytes:
    """Write `text` in a corner, `size` × the short side tall, with a soft shadow."""
    p = _validated(
        "watermark", text=text, position=position, opacity=opacity, size=size, color=color, format=format
    )
    im = load_image(image, "watermark: image")
    px = max(8, round(min(im.size) * p["size"]))
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont = (
        ImageFont.load_default(size=px) if features.check("freetype2") else ImageFont.load_default()
    )
    overlay = Image.new("RGBA", im.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    left, top_, right, bottom = draw.textbbox((0, 0), p["text"], font=font)
    tw, th = right - left, bottom - top_
    margin = max(4, px // 2)
    x = margin if p["position"].endswith("left") else im.width - tw - margin
    y = margin if p["position"].startswith("top") else im.height - th - margin
    x, y = max(0, x) - left, max(0, y) - top_
    alpha = round(255 * p["opacity"])
    shadow = max(1, px // 16)
    draw.text((x + shadow, y + shadow), p["text"], font=font, fill=(0, 0, 0, alpha // 2))
    r, g, b = (int(p["color"][i : i + 2], 16) for i in (1, 3, 5))
    draw.text((x, y), p["text"], font=font, fill=(r, g, b, alpha))
    out = Image.alpha_composite(im.convert("RGBA"), overlay)
    return encode(out if im.mode == "RGBA" else out.convert("RGB"), p["format"])


def run_operation(name: str, inputs: ImageInputs, params: Mapping[str, Any] | None = None) -> OperationResult:
    """Validate and run one local operation; ValueError for an unknown op, input or parameter."""
    spec = OPERATIONS.get(name)
    if spec is None:
        raise ValueError(f"local vendor: unknown operation {name!r} (known: {', '.join(OPERATIONS)})")
    checked = spec.validate_params(params or {})
    images = spec.validate_inputs(inputs)
    data = spec.run(*(images[i.name] for i in spec.inputs), **checked)
    with Image.open(io.BytesIO(data)) as result:
        width, height = result.size
    return OperationResult(data, spec.output_content_type(checked), width, height)
