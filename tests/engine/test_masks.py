"""engine.masks: grid regions, uploaded masks, outpainting canvases, exact compositing (pure, fast)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from engine.masks import (
    REGIONS,
    composite,
    decode_mask,
    encode_mask,
    pan_canvas,
    pan_size,
    region_mask,
    zoom_canvas,
    zoom_size,
)
from engine.validate import ValidationFailed

CAPS = {"max_bytes": 2_000_000, "max_pixels": 4096 * 4096}

# The contract's cells (column, row) of each region on the 3×3 grid.
EXPECTED_CELLS = {
    "center": {(1, 1)},
    "top": {(0, 0), (1, 0), (2, 0)},
    "bottom": {(0, 2), (1, 2), (2, 2)},
    "left": {(0, 0), (0, 1), (0, 2)},
    "right": {(2, 0), (2, 1), (2, 2)},
    "top-left": {(0, 0)},
    "top-right": {(2, 0)},
    "bottom-left": {(0, 2)},
    "bottom-right": {(2, 2)},
}


def png(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def source(width: int = 256, height: int = 256, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def cells_of(mask: Image.Image) -> set[tuple[int, int]]:
    """Cells of a size divisible by 3 that are all white; asserts every cell is uniform."""
    values = np.asarray(mask)
    height, width = values.shape
    found = set()
    for col in range(3):
        for row in range(3):
            cell = values[row * height // 3 : (row + 1) * height // 3, col * width // 3 : (col + 1) * width // 3]
            assert cell.min() == cell.max(), f"cell {(col, row)} is not uniform"
            if cell.min() == 255:
                found.add((col, row))
    return found


# --- regions -------------------------------------------------------------------------------------


def test_regions_are_the_contracts_nine() -> None:
    assert set(REGIONS) == set(EXPECTED_CELLS) and len(REGIONS) == 9


@pytest.mark.parametrize("name", sorted(EXPECTED_CELLS))
def test_each_region_covers_exactly_its_cells(name: str) -> None:
    mask = region_mask([name], (300, 210))
    assert mask.mode == "L" and mask.size == (300, 210)
    assert set(np.unique(np.asarray(mask))) <= {0, 255}
    assert cells_of(mask) == EXPECTED_CELLS[name]


def test_regions_union() -> None:
    assert cells_of(region_mask(["top-left", "bottom-right"], (96, 96))) == {(0, 0), (2, 2)}
    assert cells_of(region_mask(["top", "left"], (96, 96))) == EXPECTED_CELLS["top"] | EXPECTED_CELLS["left"]
    assert cells_of(region_mask(["top", "top", "top-left"], (96, 96))) == EXPECTED_CELLS["top"]


def test_regions_tile_any_size() -> None:
    """Sizes not divisible by 3: the nine cells still tile the image, no gap, no overlap."""
    size = (301, 203)
    total = np.zeros((203, 301), int)
    for name in ("top-left", "top-right", "bottom-left", "bottom-right", "center"):
        total += np.asarray(region_mask([name], size)) // 255
    middles = (np.asarray(region_mask(["top", "bottom", "left", "right"], size)) // 255).sum()
    everything = np.asarray(region_mask(list(REGIONS), size))
    assert everything.min() == 255
    assert total.max() == 1
    assert middles + (np.asarray(region_mask(["center"], size)) // 255).sum() == 301 * 203


def test_unknown_region_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="top-left") as info:
        region_mask(["middle"], (64, 64))
    assert "middle" in str(info.value)
    with pytest.raises(ValueError):
        region_mask([], (64, 64))


# --- uploaded masks ------------------------------------------------------------------------------


def box_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    values = np.zeros((size[1], size[0]), np.uint8)
    x0, y0, x1, y1 = box
    values[y0:y1, x0:x1] = 255
    return values


def assert_box(mask: Image.Image, size: tuple[int, int], box: tuple[int, int, int, int], tolerance: int = 0) -> None:
    assert mask.mode == "L" and mask.size == size
    values = np.asarray(mask)
    assert set(np.unique(values)) <= {0, 255}
    expected = box_mask(size, box)
    assert int((values != expected).sum()) <= tolerance * (size[0] + size[1])


def test_l_mask_same_size() -> None:
    data = png(Image.fromarray(box_mask((256, 256), (64, 32, 192, 128)), "L"))
    assert_box(decode_mask(data, (256, 256), **CAPS), (256, 256), (64, 32, 192, 128))


@pytest.mark.parametrize("mode", ["1", "RGB", "P", "LA", "RGBA"])
def test_modes_without_transparency_use_brightness(mode: str) -> None:
    mask = Image.fromarray(box_mask((128, 128), (0, 0, 64, 128)), "L").convert(mode)
    assert_box(decode_mask(png(mask), (128, 128), **CAPS), (128, 128), (0, 0, 64, 128))


def test_rgb_luminance_threshold() -> None:
    """Coloured paint: bright colours (yellow) count as white, dark ones (blue) as black."""
    values = np.zeros((64, 64, 3), np.uint8)
    values[:, :32] = (255, 255, 0)
    values[:, 32:] = (0, 0, 255)
    assert_box(decode_mask(png(Image.fromarray(values, "RGB")), (64, 64), **CAPS), (64, 64), (0, 0, 32, 64))


@pytest.mark.parametrize("colour", [(255, 255, 255), (0, 0, 0), (255, 0, 0)])
def test_rgba_strokes_on_transparency_are_the_redo_area(colour: tuple[int, int, int]) -> None:
    """A mask painted on a transparent layer: what is painted is redone, whatever the brush colour."""
    values = np.zeros((100, 100, 4), np.uint8)
    values[..., :3] = 255 - np.array(colour, np.uint8)  # transparent pixels' colour is meaningless
    values[20:60, 30:90] = (*colour, 255)
    mask = decode_mask(png(Image.fromarray(values, "RGBA")), (100, 100), **CAPS)
    assert_box(mask, (100, 100), (30, 20, 90, 60))


def test_palette_with_transparency_and_la() -> None:
    # Index 0: transparent white; index 1: opaque black (painted), as a GIF/PNG-8 export has it.
    indices = np.zeros((64, 64), np.uint8)
    indices[:32] = 1
    palette = Image.fromarray(indices, "L").convert("P")
    palette.putpalette([255, 255, 255, 0, 0, 0])
    palette.info["transparency"] = 0
    assert_box(decode_mask(png(palette), (64, 64), **CAPS), (64, 64), (0, 0, 64, 32))
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[:32] = (0, 0, 0, 255)
    la = Image.fromarray(rgba[..., [0, 3]], "LA")
    assert_box(decode_mask(png(la), (64, 64), **CAPS), (64, 64), (0, 0, 64, 32))


@pytest.mark.parametrize(
    ("mask_size", "image_size"),
    [((64, 64), (256, 256)), ((1024, 1024), (256, 256)), ((200, 100), (400, 200)), ((90, 160), (256, 128))],
)
def test_any_mask_size_is_scaled_to_the_image(mask_size: tuple[int, int], image_size: tuple[int, int]) -> None:
    """The left half of the mask is the left half of the image, at any size or aspect."""
    mw, mh = mask_size
    data = png(Image.fromarray(box_mask(mask_size, (0, 0, mw // 2, mh)), "L"))
    mask = decode_mask(data, image_size, **CAPS)
    assert_box(mask, image_size, (0, 0, image_size[0] // 2, image_size[1]), tolerance=1)
    assert abs(np.asarray(mask).mean() / 255 - 0.5) < 0.02


def test_lossy_grey_mask_is_thresholded() -> None:
    grey = Image.fromarray(box_mask((128, 128), (32, 32, 96, 96)), "L")
    mask = decode_mask(png(grey, "JPEG"), (128, 128), **CAPS)
    assert_box(mask, (128, 128), (32, 32, 96, 96), tolerance=1)


def test_sixteen_bit_mask() -> None:
    values = (box_mask((64, 64), (0, 0, 64, 16)).astype(np.uint16) * 257).astype(np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    assert_box(decode_mask(png(image), (64, 64), **CAPS), (64, 64), (0, 0, 64, 16))


def test_empty_and_full_masks_refused() -> None:
    with pytest.raises(ValidationFailed, match="all black") as info:
        decode_mask(png(Image.new("L", (64, 64), 0)), (64, 64), **CAPS)
    assert info.value.field == "mask"
    with pytest.raises(ValidationFailed, match="all black"):
        decode_mask(png(Image.new("RGBA", (64, 64), (255, 255, 255, 0))), (64, 64), **CAPS)
    with pytest.raises(ValidationFailed, match="/generate") as info:
        decode_mask(png(Image.new("L", (64, 64), 255)), (64, 64), **CAPS)
    assert info.value.field == "mask" and "all white" in info.value.message
    # A few white pixels vanish when the mask is scaled down a lot: nothing left to redo.
    tiny = Image.new("L", (1000, 1000), 0)
    tiny.putpixel((500, 500), 255)
    with pytest.raises(ValidationFailed, match="all black"):
        decode_mask(png(tiny), (64, 64), **CAPS)


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b"%!PS-Adobe-3.0"])
def test_non_images_refused(data: bytes) -> None:
    with pytest.raises(ValidationFailed) as info:
        decode_mask(data, (64, 64), **CAPS)
    assert info.value.field == "mask" and info.value.message.startswith("The mask")


def test_caps_apply() -> None:
    data = png(Image.fromarray(box_mask((512, 512), (0, 0, 256, 512)), "L"))
    with pytest.raises(ValidationFailed, match="limit") as info:
        decode_mask(data, (64, 64), max_bytes=len(data) - 1, max_pixels=10**8)
    assert info.value.field == "mask"
    with pytest.raises(ValidationFailed, match="megapixels") as info:
        decode_mask(data, (64, 64), max_bytes=10**8, max_pixels=512 * 511)
    assert info.value.field == "mask" and info.value.message.startswith("The mask")


def test_encode_mask_round_trips() -> None:
    mask = region_mask(["left"], (96, 64))
    assert np.array_equal(np.asarray(decode_mask(encode_mask(mask), (96, 64), **CAPS)), np.asarray(mask))


# --- outpainting ---------------------------------------------------------------------------------


def check_outpaint(canvas: Image.Image, mask: Image.Image, keep: tuple[int, int, int, int], kept: Image.Image) -> None:
    """The kept box holds `kept` bit for bit, the mask is 0 exactly there and > 0 everywhere else,
    fully 255 far from it."""
    assert canvas.mode == "RGB" and mask.mode == "L" and canvas.size == mask.size
    assert np.array_equal(np.asarray(canvas.crop(keep)), np.asarray(kept))
    values = np.asarray(mask)
    x0, y0, x1, y1 = keep
    inside = np.zeros(values.shape, bool)
    inside[y0:y1, x0:x1] = True
    assert values[inside].max() == 0
    assert values[~inside].min() > 0
    assert values.max() == 255


@pytest.mark.parametrize("factor", [1.5, 2])
@pytest.mark.parametrize("size", [(256, 256), (320, 192), (1024, 1024)])
def test_zoom_canvas(factor: float, size: tuple[int, int]) -> None:
    image = source(*size)
    canvas, mask, keep = zoom_canvas(image, factor, seed=3)
    assert canvas.size == size
    small = zoom_size(size, factor)
    assert all(abs(s - side / factor) <= 1 for s, side in zip(small, size, strict=True))
    x0, y0, x1, y1 = keep
    assert (x1 - x0, y1 - y0) == small
    assert x0 == size[0] - x1 and y0 == size[1] - y1  # centred, equal margins
    check_outpaint(canvas, mask, keep, image.resize(small, Image.Resampling.LANCZOS))


def test_zoom_is_deterministic_and_seeded() -> None:
    image = source(128, 128)
    first, second, other = (zoom_canvas(image, 2, seed=s) for s in (5, 5, 6))
    assert first[0].tobytes() == second[0].tobytes() and first[1].tobytes() == second[1].tobytes()
    assert first[0].tobytes() != other[0].tobytes()


def test_zoom_refuses_other_factors() -> None:
    with pytest.raises(ValidationFailed):
        zoom_canvas(source(64, 64), 3)


@pytest.mark.parametrize(
    ("direction", "size", "expected"),
    [
        ("left", (256, 256), (384, 256)),
        ("right", (256, 256), (384, 256)),
        ("up", (256, 256), (256, 384)),
        ("down", (256, 256), (256, 384)),
        ("left", (1024, 768), (1536, 768)),
        ("down", (832, 1216), (832, 1856)),
        ("right", (832, 1216), (1280, 1216)),
    ],
)
def test_pan_canvas(direction: str, size: tuple[int, int], expected: tuple[int, int]) -> None:
    image = source(*size)
    canvas, mask, keep = pan_canvas(image, direction, max_side=4096, seed=1)  # type: ignore[arg-type]
    assert canvas.size == expected == pan_size(size, direction)  # type: ignore[arg-type]
    assert expected[0] % 64 == 0 and expected[1] % 64 == 0
    width, height = expected
    # The source sits against the side opposite the pan.
    anchors = {
        "left": (width - size[0], 0),
        "right": (0, 0),
        "up": (0, height - size[1]),
        "down": (0, 0),
    }
    x0, y0 = anchors[direction]
    assert keep == (x0, y0, x0 + size[0], y0 + size[1])
    check_outpaint(canvas, mask, keep, image)


def test_pan_over_max_side_refused() -> None:
    with pytest.raises(ValidationFailed, match="2048") as info:
        pan_canvas(source(1536, 256), "left", max_side=2048)
    assert info.value.field == "direction"
    pan_canvas(source(1536, 256), "up", max_side=2048)  # the other way fits
    with pytest.raises(ValidationFailed):
        pan_canvas(source(64, 64), "sideways", max_side=2048)  # type: ignore[arg-type]


def test_outpaint_seam_is_soft_inside_the_new_area() -> None:
    _, mask, keep = pan_canvas(source(256, 256), "right", max_side=4096)
    row = np.asarray(mask)[128, keep[2] :]
    assert row[0] > 0 and row[0] < 64  # next to the source: mostly pre-fill
    assert np.all(np.diff(row.astype(int)) >= 0) and row[-1] == 255


# --- compositing ---------------------------------------------------------------------------------


def test_composite_keeps_source_bits_and_blends() -> None:
    src, gen = source(64, 64, seed=1), source(64, 64, seed=2)
    values = np.zeros((64, 64), np.uint8)
    values[:, 32:] = 255
    values[:, 20:32] = np.linspace(1, 254, 12, dtype=np.uint8)
    out = np.asarray(composite(src, gen, Image.fromarray(values, "L"))).astype(int)
    s, g = np.asarray(src).astype(int), np.asarray(gen).astype(int)
    assert np.array_equal(out[:, :20], s[:, :20])
    assert np.array_equal(out[:, 32:], g[:, 32:])
    alpha = values[:, 20:32, None] / 255
    assert np.abs(out[:, 20:32] - (s[:, 20:32] * (1 - alpha) + g[:, 20:32] * alpha)).max() <= 1


def test_composite_outpaint_round_trip() -> None:
    image = source(192, 128)
    canvas, mask, keep = zoom_canvas(image, 1.5)
    out = composite(canvas, source(192, 128, seed=9), mask)
    assert np.array_equal(np.asarray(out.crop(keep)), np.asarray(canvas.crop(keep)))


def test_composite_refuses_mismatched_sizes() -> None:
    with pytest.raises(ValueError):
        composite(source(64, 64), source(64, 32), Image.new("L", (64, 64)))


def test_exif_orientation_applied_like_the_image() -> None:
    """decode_image turns a photo upright by its EXIF tag; the mask drawn on it must turn too."""
    mask = Image.fromarray(box_mask((64, 32), (0, 0, 32, 32)), "L")
    exif = Image.Exif()
    exif[0x0112] = 3  # rotated 180°
    out = io.BytesIO()
    mask.save(out, "PNG", exif=exif)
    assert_box(decode_mask(out.getvalue(), (64, 32), **CAPS), (64, 32), (32, 0, 64, 32))


def test_webp_mask_with_alpha() -> None:
    values = np.zeros((64, 64, 4), np.uint8)
    values[8:40, 16:48] = (0, 0, 0, 255)
    out = io.BytesIO()
    Image.fromarray(values, "RGBA").save(out, "WEBP", lossless=True)
    assert_box(decode_mask(out.getvalue(), (128, 128), **CAPS), (128, 128), (32, 16, 96, 80), tolerance=1)
