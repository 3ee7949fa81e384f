"""The built-in `local` vendor's Pillow operations, on generated images."""

from __future__ import annotations

import inspect
import io
import json
from typing import Any

import pytest
from PIL import Image, ImageDraw, ImageStat

from server.vendors.local import OPERATIONS, STYLES, run_operation

RED, BLUE, GREY = (255, 0, 0), (0, 0, 255), (128, 128, 128)


def encode(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def square_on_backdrop(size: int = 100, backdrop: tuple[int, int, int] = RED) -> Image.Image:
    """A blue square over the middle 40 % of a plain backdrop."""
    image = Image.new("RGB", (size, size), backdrop)
    lo, hi = int(size * 0.3), int(size * 0.7) - 1
    ImageDraw.Draw(image).rectangle((lo, lo, hi, hi), fill=BLUE)
    return image


def gradient(width: int = 64, height: int = 48) -> Image.Image:
    image = Image.new("RGB", (width, height))
    image.putdata(
        [(x * 4 % 256, y * 5 % 256, (x + y) * 2 % 256) for y in range(height) for x in range(width)]
    )
    return image


def pixel(image: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    value = image.getpixel(xy)
    assert isinstance(value, tuple)
    return value


def run(op: str, image: Image.Image, **params: Any) -> Image.Image:
    return decode(run_operation(op, {"image": encode(image)}, params).data)


def test_matting_a_square_on_a_red_backdrop_leaves_a_transparent_border_and_an_opaque_centre() -> None:
    out = run("matting", square_on_backdrop())
    assert out.mode == "RGBA"
    for corner in [(0, 0), (99, 0), (0, 99), (99, 99), (20, 50)]:
        assert pixel(out, corner)[3] == 0
    assert pixel(out, (50, 50)) == (*BLUE, 255)


def test_matting_tolerates_jpeg_noise_in_the_backdrop_and_always_answers_png() -> None:
    noisy = encode(square_on_backdrop(200, backdrop=(40, 180, 60)), "JPEG", quality=60)
    result = run_operation("matting", {"image": noisy})
    assert result.content_type == "image/png"
    out = decode(result.data)
    assert out.getchannel("A").crop((0, 0, 200, 40)).getextrema() == (0, 0)
    assert pixel(out, (100, 100))[3] == 255


def test_tryon_compose_keeps_the_person_size_and_puts_the_garment_on_the_torso() -> None:
    person = Image.new("RGB", (200, 300), GREY)
    result = run_operation(
        "tryon_compose", {"person": encode(person), "garment": encode(square_on_backdrop())}
    )
    out = decode(result.data)
    assert (result.width, result.height) == out.size == (200, 300)
    assert pixel(out, (100, 120)) == BLUE  # upper middle: the torso
    assert pixel(out, (10, 10)) == GREY  # head-height corner untouched
    assert pixel(out, (100, 290)) == GREY  # legs untouched
    blue = [(x, y) for y in range(300) for x in range(200) if pixel(out, (x, y)) == BLUE]
    xs, ys = [x for x, _ in blue], [y for _, y in blue]
    assert abs((min(xs) + max(xs)) / 2 - 100) <= 1  # centred
    assert 0.25 * 200 < max(xs) - min(xs) < 0.45 * 200  # the garment is 45 % of the width, edges soft
    assert min(ys) >= 0.25 * 300 - 2


def test_tryon_compose_with_matte_never_pastes_the_whole_garment_rectangle() -> None:
    person = Image.new("RGB", (200, 300), GREY)
    data = run_operation(
        "tryon_compose",
        {"person": encode(person), "garment": encode(square_on_backdrop())},
        {"matte": "never", "scale": 0.5, "top": 0.2},
    ).data
    out = decode(data)
    assert pixel(out, (52, 62)) == RED  # the garment's own backdrop came along
    assert pixel(out, (100, 110)) == BLUE


@pytest.mark.parametrize("name", STYLES)
def test_each_style_filter_changes_the_pixels_but_not_the_size(name: str) -> None:
    source = gradient()
    out = run("style", source, filter=name)
    assert out.size == source.size
    assert out.convert("RGB").tobytes() != source.tobytes()


def test_warm_raises_red_and_lowers_blue_and_cool_does_the_opposite() -> None:
    source = Image.new("RGB", (32, 32), GREY)
    warm = ImageStat.Stat(run("style", source, filter="warm")).mean
    cool = ImageStat.Stat(run("style", source, filter="cool")).mean
    assert warm[0] > 128 > warm[2]
    assert cool[2] > 128 > cool[0]


def test_mono_makes_every_pixel_grey_and_strength_zero_changes_nothing() -> None:
    mono = run("style", gradient(), filter="mono")
    r, g, b = mono.split()
    assert r.tobytes() == g.tobytes() == b.tobytes()
    assert run("style", gradient(), filter="vivid", strength=0.0).tobytes() == gradient().tobytes()


def test_a_grid_of_four_is_two_by_two_cells_with_gaps() -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    images = [encode(Image.new("RGB", (50, 50), c)) for c in colours]
    result = run_operation("grid", {"images": images}, {"cell": 100, "gap": 10})
    out = decode(result.data)
    assert out.size == (2 * 100 + 3 * 10,) * 2
    assert [pixel(out, p) for p in [(60, 60), (170, 60), (60, 170), (170, 170)]] == colours
    assert pixel(out, (5, 5)) == (255, 255, 255)


def test_a_grid_of_three_uses_two_columns_and_two_rows() -> None:
    images = [encode(gradient())] * 3
    out = decode(run_operation("grid", {"images": images}, {"cell": 64, "gap": 0}).data)
    assert out.size == (128, 128)


def test_a_watermark_marks_only_its_corner() -> None:
    out = run("watermark", Image.new("RGB", (400, 300), (0, 0, 0)), text="Wardrobe", position="bottom-right")
    left, top, right, bottom = out.getbbox() or (0, 0, 0, 0)
    assert left > 200 and top > 150 and right <= 400 and bottom <= 300


@pytest.mark.parametrize(
    ("params", "size"),
    [
        ({"width": 100}, (100, 50)),
        ({"height": 100}, (200, 100)),
        ({"width": 100, "height": 100}, (100, 50)),
        ({"width": 100, "height": 100, "mode": "fill"}, (100, 100)),
        ({"width": 100, "height": 30, "mode": "stretch"}, (100, 30)),
    ],
)
def test_resize_follows_its_mode(params: dict[str, Any], size: tuple[int, int]) -> None:
    assert run("resize", gradient(400, 200), **params).size == size


def test_crop_cuts_a_box_or_a_centred_aspect() -> None:
    assert run("crop", gradient(400, 200), left=10, top=20, width=30, height=40).size == (30, 40)
    assert run("crop", gradient(400, 200), aspect="3:4").size == (150, 200)


def test_jpeg_output_is_given_when_asked_for() -> None:
    result = run_operation("resize", {"image": encode(gradient())}, {"width": 32, "format": "jpeg"})
    assert result.content_type == "image/jpeg"
    assert decode(result.data).format == "JPEG"


@pytest.mark.parametrize(
    ("op", "params", "message"),
    [
        ("resize", {"widht": 10}, "unknown parameter 'widht'"),
        ("resize", {}, "give width, height or both"),
        ("resize", {"width": 0}, "at least 1"),
        ("resize", {"width": True}, "must be an integer"),
        ("resize", {"width": 8192, "height": 8192, "mode": "stretch"}, "megapixels"),
        ("resize", {"width": 10, "mode": "squash"}, "must be one of fit, fill, stretch"),
        ("crop", {"left": 0}, "either all of left, top, width, height"),
        ("crop", {"left": 0, "top": 0, "width": 500, "height": 10}, "outside the 64×48 image"),
        ("crop", {"aspect": "wide"}, "aspect must look like 3:4"),
        ("matting", {"tolerance": 300}, "at most 255"),
        ("style", {}, "'filter' is required"),
        ("style", {"filter": "glitter"}, "must be one of mono"),
        ("style", {"filter": "mono", "strength": float("nan")}, "must be a number"),
        ("watermark", {"color": "white"}, "colour like #ff8800"),
        ("watermark", {"text": "x" * 65}, "1–64 printable characters"),
    ],
)
def test_bad_parameters_are_value_errors_that_say_what_is_wrong(
    op: str, params: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        run_operation(op, {"image": encode(gradient())}, params)


@pytest.mark.parametrize(
    ("op", "inputs", "message"),
    [
        ("blur", {"image": b""}, "unknown operation 'blur'"),
        ("tryon_compose", {"person": b""}, "takes inputs garment, person"),
        ("grid", {"images": [b"x"]}, "takes 2–16 images, got 1"),
        ("grid", {"images": b"x"}, "must be a list of images"),
        ("resize", {"image": b"GIF89a not allowed"}, "not a JPEG, PNG or WebP image"),
        ("resize", {"image": b"\x89PNG\r\n\x1a\n truncated"}, "resize: image"),
    ],
)
def test_bad_operations_and_inputs_are_value_errors(op: str, inputs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        run_operation(op, inputs, {"width": 10} if op == "resize" else {})


def test_the_registry_defaults_match_the_functions_and_describe_as_json() -> None:
    assert set(OPERATIONS) == {"resize", "crop", "matting", "tryon_compose", "style", "grid", "watermark"}
    for name, spec in OPERATIONS.items():
        signature = inspect.signature(spec.run)
        keyword = {p.name: p.default for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY}
        positional = [p.name for p in signature.parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
        assert positional == [i.name for i in spec.inputs], name
        defaults = {k: (None if v is inspect.Parameter.empty else v) for k, v in keyword.items()}
        assert defaults == {k: p.default for k, p in spec.params.items()}, name
        json.dumps(spec.describe())
