"""Control maps: Canny edges, and depth and pose estimators loaded offline from the tiny fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from engine import annotators
from engine.annotators import (
    OPENPOSE_COLORS,
    DepthEstimator,
    PoseEstimator,
    clear_annotators,
    draw_pose,
    edges,
    load_annotator,
)
from engine.tiny_addons import DEPTH_ANNOTATOR, POSE_ANNOTATOR, build_tiny_addons


@pytest.fixture(scope="module")
def addons_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-addons-annotators")
    (folder / "base").symlink_to(tiny_model_dir / "base", target_is_directory=True)
    build_tiny_addons(folder)
    return folder


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    clear_annotators()
    yield
    clear_annotators()


def _rectangle(size: tuple[int, int] = (120, 90)) -> Image.Image:
    image = Image.new("RGB", size, (30, 30, 30))
    ImageDraw.Draw(image).rectangle((30, 20, 89, 69), fill=(220, 220, 220))
    return image


def test_edges_are_white_on_the_rectangle_border_and_black_in_flat_areas() -> None:
    found = edges(_rectangle())
    assert found.mode == "RGB" and found.size == (120, 90)
    pixels = np.asarray(found)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    assert set(np.unique(pixels)) <= {0, 255}
    near_border = pixels[18:72, 28:92]
    assert (near_border == 255).any()
    for x in (29, 30, 89, 90):  # the left and right sides: an edge at or next to them
        assert (pixels[30:60, x - 1 : x + 1] == 255).any(), x
    assert not pixels[30:60, 40:80].any()  # inside the rectangle
    assert not pixels[:10].any() and not pixels[:, :15].any()  # outside it


def test_edge_thresholds_matter() -> None:
    faint = Image.new("RGB", (64, 64), (100, 100, 100))
    ImageDraw.Draw(faint).rectangle((16, 16, 47, 47), fill=(115, 115, 115))
    assert not np.asarray(edges(faint)).any()  # a step of 15 is below the default thresholds
    assert np.asarray(edges(faint, low=10, high=20)).any()


def test_depth_estimator_loads_offline_and_maps_at_the_input_size(addons_dir: Path) -> None:
    estimator = DepthEstimator(str(addons_dir / DEPTH_ANNOTATOR))
    image = _rectangle((100, 70))
    depth = estimator(image)
    assert depth.mode == "RGB" and depth.size == (100, 70)
    pixels = np.asarray(depth)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    assert pixels.min() == 0 and pixels.max() == 255  # normalised per image
    assert estimator(Image.new("L", (40, 30))).size == (40, 30)  # any mode in, RGB out


def test_pose_estimator_loads_offline_and_draws_at_the_input_size(addons_dir: Path) -> None:
    estimator = PoseEstimator(str(addons_dir / POSE_ANNOTATOR))
    image = _rectangle((100, 70))
    points = estimator.keypoints(image)
    assert points.shape == (17, 3) and np.isfinite(points).all()
    pose = estimator(image)
    assert pose.mode == "RGB" and pose.size == (100, 70)
    assert np.asarray(estimator(image, threshold=float("-inf"))).any()  # every keypoint drawn
    assert not np.asarray(estimator(image, threshold=float("inf"))).any()  # none: all black


def _standing_person() -> np.ndarray:
    """COCO keypoints of a person facing the viewer in a 200×200 image, all confident."""
    xy = [
        (100, 40), (106, 34), (94, 34), (112, 38), (88, 38),  # nose, eyes, ears
        (125, 60), (75, 60), (135, 95), (65, 95), (140, 130), (60, 130),  # shoulders, elbows, wrists
        (115, 120), (85, 120), (117, 155), (83, 155), (118, 190), (82, 190),  # hips, knees, ankles
    ]  # fmt: skip
    return np.array([(x, y, 1.0) for x, y in xy], dtype=np.float32)


def test_draw_pose_paints_openpose_limbs_and_skips_unsure_keypoints() -> None:
    person = _standing_person()
    picture = np.asarray(draw_pose(person, (200, 200)))
    assert picture.shape == (200, 200, 3)
    # OpenPose's colour for the right wrist (its keypoint 4 = COCO 10, at (60, 130)).
    assert tuple(picture[130, 60]) == OPENPOSE_COLORS[4]
    # The neck (shoulders' midpoint, (100, 60)) is OpenPose keypoint 1.
    assert tuple(picture[60, 100]) == OPENPOSE_COLORS[1]
    assert not picture[5:25, 5:25].any()  # background stays black

    person[10, 2] = 0.1  # the right wrist is unsure: no joint, no forearm
    unsure = np.asarray(draw_pose(person, (200, 200), threshold=0.3))
    assert not unsure[128:133, 58:63].any()
    person[5, 2] = 0.1  # one shoulder unsure: no neck either
    assert not np.asarray(draw_pose(person, (200, 200)))[58:63, 98:103].any()


def test_load_annotator_loads_each_estimator_once(addons_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[str] = []

    class CountingDepth(DepthEstimator):
        def __init__(self, source: str, device: torch.device | str = "cpu") -> None:
            loads.append(source)
            super().__init__(source, device)

    monkeypatch.setattr(annotators, "DepthEstimator", CountingDepth)
    depth_source = str(addons_dir / DEPTH_ANNOTATOR)
    first = load_annotator("depth", depth_source, "cpu")
    assert load_annotator("depth", depth_source, torch.device("cpu")) is first
    assert loads == [depth_source]
    pose = load_annotator("pose", str(addons_dir / POSE_ANNOTATOR), "cpu")
    assert isinstance(pose, PoseEstimator) and isinstance(first, CountingDepth)
    clear_annotators()
    assert load_annotator("depth", depth_source, "cpu") is not first
    assert loads == [depth_source, depth_source]


def test_unknown_mode_and_uncached_hub_id_are_refused() -> None:
    with pytest.raises(ValueError, match="no annotator"):
        load_annotator("canny", "anything")  # type: ignore[arg-type]
    # HF_HUB_OFFLINE is set for the tests: a hub id not in the cache fails at once, no download.
    with pytest.raises(OSError):
        load_annotator("depth", "nobody-atelier/no-such-depth-model")
