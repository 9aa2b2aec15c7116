"""Control maps for ControlNet: edges (Canny), depth and pose, made from a member's upload.

Runs in the engine process. Edges need no weights (OpenCV). Depth and pose run a transformers
model named by the operator (`[controlnets.<mode>] annotator`: a hub id or a local folder), loaded
once per (mode, source, device) and kept: `load_annotator`. Every map is an RGB image of the
input's size, the form ControlNets are trained on: white edges on black, grey inverse depth (near
is bright), an OpenPose-style stick figure (coloured limbs on black).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from engine.models import quiet_progress
from engine.weights import hub_offline

log = logging.getLogger(__name__)

AnnotatorMode = Literal["depth", "pose"]

# OpenPose's 18 keypoints, as ControlNet pose models were trained on them (controlnet_aux's
# drawing): nose, neck, r-shoulder, r-elbow, r-wrist, l-shoulder, l-elbow, l-wrist, r-hip, r-knee,
# r-ankle, l-hip, l-knee, l-ankle, r-eye, l-eye, r-ear, l-ear. Index into COCO's 17 (VitPose's
# order); None = the neck, which COCO lacks: the shoulders' midpoint.
OPENPOSE_FROM_COCO: tuple[int | None, ...] = (0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
OPENPOSE_LIMBS: tuple[tuple[int, int], ...] = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip
OPENPOSE_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
COCO_KEYPOINTS = 17
# Top-down pose models see the person box enlarged by this much (VitPose's box_to_center_and_scale).
BOX_PADDING = 1.25
POSE_THRESHOLD = 0.3  # keypoints scoring less are not drawn (as controlnet_aux and VitPose's demo)


def edges(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """Canny edges: white on black, 3 channels, the input's size."""
    import cv2

    grey = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)
    found = cv2.Canny(grey, low, high)
    return Image.fromarray(found).convert("RGB")


def _local_only(source: str) -> bool:
    """A folder never touches the hub; a hub id does only when the hub is reachable."""
    return Path(source).is_dir() or hub_offline()


class DepthEstimator:
    """A transformers depth-estimation model (DPT, Depth Anything…) from a hub id or local folder."""

    def __init__(self, source: str, device: torch.device | str = "cpu") -> None:
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        local = _local_only(source)
        self.device = torch.device(device)
        self.processor = AutoImageProcessor.from_pretrained(source, local_files_only=local)
        model = AutoModelForDepthEstimation.from_pretrained(source, local_files_only=local, use_safetensors=True)
        self.model = model.to(self.device).eval()

    @torch.inference_mode()
    def __call__(self, image: Image.Image) -> Image.Image:
        rgb = image.convert("RGB")
        inputs = self.processor(images=rgb, return_tensors="pt").to(self.device)
        predicted = self.model(**inputs).predicted_depth.float()  # (1, h, w), relative inverse depth
        depth = torch.nn.functional.interpolate(
            predicted[:, None], size=(rgb.height, rgb.width), mode="bicubic", align_corners=False
        )[0, 0]
        # Min-max to 0–255: ControlNets are trained on per-image normalised maps.
        low, high = depth.min(), depth.max()
        scaled = (depth - low) / (high - low) if high > low else torch.zeros_like(depth)
        grey = (scaled * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
        return Image.fromarray(grey).convert("RGB")


class PoseEstimator:
    """A top-down keypoint model (transformers' VitPose, COCO's 17 keypoints); one box = the image.

    The pre- and post-processing are done here with OpenCV rather than by VitPoseImageProcessor,
    which needs scipy (its affine warp and DARK refinement); the processor config still gives the
    input size and normalisation.
    """

    def __init__(self, source: str, device: torch.device | str = "cpu", threshold: float = POSE_THRESHOLD) -> None:
        from transformers import VitPoseForPoseEstimation
        from transformers.image_processing_base import ImageProcessingMixin

        local = _local_only(source)
        self.device = torch.device(device)
        self.threshold = threshold
        processor, _ = ImageProcessingMixin.get_image_processor_dict(source, local_files_only=local)
        size = processor.get("size") or {"height": 256, "width": 192}
        self.input_size = (int(size["width"]), int(size["height"]))
        self.mean = np.asarray(processor.get("image_mean", [0.485, 0.456, 0.406]), dtype=np.float32)
        self.std = np.asarray(processor.get("image_std", [0.229, 0.224, 0.225]), dtype=np.float32)
        model = VitPoseForPoseEstimation.from_pretrained(source, local_files_only=local, use_safetensors=True)
        if model.config.num_labels != COCO_KEYPOINTS:
            raise ValueError(
                f"{source}: a pose annotator must predict COCO's 17 keypoints, not {model.config.num_labels}"
            )
        self.model = model.to(self.device).eval()
        # VitPose+ (mixture of experts) picks its head by dataset; 0 is COCO.
        experts = getattr(model.config.backbone_config, "num_experts", 1)
        self.extra: dict[str, Any] = {"dataset_index": torch.tensor([0], device=self.device)} if experts > 1 else {}

    def keypoints(self, image: Image.Image) -> np.ndarray:
        """(17, 3): x, y in the image's pixels and the score of each COCO keypoint."""
        import cv2

        rgb = np.asarray(image.convert("RGB"))
        height, width = rgb.shape[:2]
        in_w, in_h = self.input_size
        # The whole image as the person box, grown to the model's aspect ratio and padded.
        box_w, box_h = float(width), float(height)
        if box_w > box_h * in_w / in_h:
            box_h = box_w * in_h / in_w
        else:
            box_w = box_h * in_w / in_h
        scale = in_w / (box_w * BOX_PADDING)
        shift = np.array([in_w / 2 - scale * width / 2, in_h / 2 - scale * height / 2])
        warp = np.array([[scale, 0.0, shift[0]], [0.0, scale, shift[1]]], dtype=np.float32)
        crop = cv2.warpAffine(rgb, warp, (in_w, in_h), flags=cv2.INTER_LINEAR)
        pixels = (crop.astype(np.float32) / 255.0 - self.mean) / self.std
        batch = torch.from_numpy(pixels.transpose(2, 0, 1)[None]).to(self.device)
        with torch.inference_mode():
            heatmaps = self.model(pixel_values=batch, **self.extra).heatmaps[0].float().cpu().numpy()
        _, map_h, map_w = heatmaps.shape
        flat = heatmaps.reshape(len(heatmaps), -1)
        best = flat.argmax(axis=1)
        scores = flat[np.arange(len(flat)), best]
        ys, xs = np.divmod(best, map_w)
        # Heatmap cell centre → model input pixels → image pixels (undo the warp).
        in_x = (xs + 0.5) * in_w / map_w - 0.5
        in_y = (ys + 0.5) * in_h / map_h - 0.5
        return np.stack([(in_x - shift[0]) / scale, (in_y - shift[1]) / scale, scores], axis=1)

    def __call__(self, image: Image.Image, threshold: float | None = None) -> Image.Image:
        points = self.keypoints(image)
        return draw_pose(points, image.size, self.threshold if threshold is None else threshold)


def draw_pose(coco: np.ndarray, size: tuple[int, int], threshold: float = POSE_THRESHOLD) -> Image.Image:
    """COCO keypoints (17, 3) → an OpenPose-style stick figure on black, `size` = (width, height)."""
    import cv2

    width, height = size
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    points: list[tuple[float, float] | None] = []
    for index in OPENPOSE_FROM_COCO:
        if index is None:  # neck: only between two confident shoulders
            left, right = coco[5], coco[6]
            seen = left[2] >= threshold and right[2] >= threshold
            points.append(((left[0] + right[0]) / 2, (left[1] + right[1]) / 2) if seen else None)
        else:
            x, y, score = coco[index]
            points.append((x, y) if score >= threshold else None)
    stick = max(1, round(max(width, height) / 128))  # controlnet_aux draws 4 px at 512
    for (a, b), color in zip(OPENPOSE_LIMBS, OPENPOSE_COLORS, strict=False):
        pa, pb = points[a], points[b]
        if pa is not None and pb is not None:
            # 0.6 of the colour, as controlnet_aux paints limbs, so joints stay distinguishable.
            dim = tuple(int(c * 0.6) for c in color)
            cv2.line(canvas, _pixel(pa), _pixel(pb), dim, thickness=stick, lineType=cv2.LINE_AA)
    for point, color in zip(points, OPENPOSE_COLORS, strict=True):
        if point is not None:
            cv2.circle(canvas, _pixel(point), stick, color, thickness=-1)
    return Image.fromarray(canvas)


def _pixel(point: tuple[float, float]) -> tuple[int, int]:
    return round(float(point[0])), round(float(point[1]))


Annotator = DepthEstimator | PoseEstimator
_loaded: dict[tuple[str, str, str], Annotator] = {}
_lock = threading.Lock()


def load_annotator(mode: AnnotatorMode, source: str, device: torch.device | str = "cpu") -> Annotator:
    """The estimator for `mode` from `source` on `device`, loaded on first use and then kept."""
    key = (mode, source, str(torch.device(device)))
    with _lock:  # one load even when two jobs ask at once
        if key not in _loaded:
            started = time.perf_counter()
            with quiet_progress():
                if mode == "depth":
                    _loaded[key] = DepthEstimator(source, device)
                elif mode == "pose":
                    _loaded[key] = PoseEstimator(source, device)
                else:
                    raise ValueError(f"no annotator for control mode {mode!r}")
            log.info("%s annotator loaded from %s in %.1f s", mode, source, time.perf_counter() - started)
        return _loaded[key]


def clear_annotators() -> None:
    """Forget the loaded estimators (their memory goes once no job holds them)."""
    with _lock:
        _loaded.clear()


__all__ = [
    "DepthEstimator",
    "PoseEstimator",
    "clear_annotators",
    "draw_pose",
    "edges",
    "load_annotator",
]
