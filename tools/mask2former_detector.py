"""GenEval's object detector without mmdet: transformers' Mask2Former (COCO instance segmentation).

GenEval (Ghosh et al. 2023) runs mmdet's ``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco``; the
transformers port (``facebook/mask2former-swin-small-coco-instance``) has the same architecture but
its own weights and preprocessing, so scores are GenEval-compatible, not bit-identical.

Post-processing follows mmdet's ``MaskFormerFusionHead.instance_postprocess``, which GenEval ran:
the top-100 (query, class) pairs by class probability, masks binarized at logit 0 *at image
resolution*, score = class probability × mean mask probability inside the mask, box = the mask's
extent. transformers' ``post_process_instance_segmentation`` computes the same scores but binarizes at
a fixed 384² and upsamples the binary mask with nearest-neighbour, which moves boxes on 1024² images.

Pre-processing is mmdet's test pipeline for that config, not the checkpoint processor's own size (384²
in the published facebook processors): ``Resize(img_scale=(1333, 800), keep_ratio=True)`` — the
shortest edge to 800 unless the longest would pass 1333 — then ``Normalize`` (ImageNet mean/std, the
processor's) and ``Pad(size_divisor=32)`` on the bottom/right. Small objects and counts (threshold 0.9)
depend on it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clvr_agent.eval.rules import MAX_OBJECTS, THRESHOLD, Detection, load_object_names
from clvr_agent.tools.loading import default_device, parse_dtype

# mmdet's test_cfg.max_per_image for this config (and the number of queries).
MAX_PER_IMAGE = 100
# mmdet's test pipeline: Resize(img_scale=(1333, 800), keep_ratio=True), Pad(size_divisor=32).
TEST_SCALE = (1333, 800)  # (longest edge, shortest edge)
SIZE_DIVISOR = 32
# detectron2/transformers spell three COCO classes differently from GenEval's object_names.txt.
LABEL_ALIASES = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}


def geneval_names(id2label: dict, names: Optional[Sequence[str]] = None) -> list[str]:
    """GenEval's class name for each model label id; the labels must be exactly the 80 COCO things."""
    names = list(names or load_object_names())
    known = set(names)
    mapped = [LABEL_ALIASES.get(id2label[i], id2label[i]) for i in range(len(id2label))]
    unknown = [label for label in mapped if label not in known]
    missing = sorted(known - set(mapped))
    if unknown or missing or len(mapped) != len(names):
        raise ValueError(
            f"the detector's labels are not GenEval's 80 COCO classes (unknown: {unknown[:5]}, missing: "
            f"{missing[:5]}); use a COCO *instance* checkpoint such as facebook/mask2former-swin-small-coco-instance"
        )
    return mapped


def rescaled_size(width: int, height: int, scale: tuple[int, int] = TEST_SCALE) -> tuple[int, int]:
    """(height, width) after mmcv's keep-ratio rescale to ``scale`` = (long, short):
    factor = min(long / max(h, w), short / min(h, w)), each side rounded half up (``rescale_size``)."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def padded_size(height: int, width: int, divisor: int = SIZE_DIVISOR) -> tuple[int, int]:
    """(height, width) padded up to multiples of ``divisor`` (mmdet's ``Pad(size_divisor=32)``)."""
    return -(-height // divisor) * divisor, -(-width // divisor) * divisor


def mask_to_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """mmdet's ``mask2bbox``: (x_min, y_min, x_max + 1, y_max + 1) of the True pixels; zeros if none."""
    xs = np.flatnonzero(mask.any(axis=0))
    ys = np.flatnonzero(mask.any(axis=1))
    if len(xs) == 0 or len(ys) == 0:
        return (0.0, 0.0, 0.0, 0.0)
    return (float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1))


class Mask2FormerDetector:
    """``detector(image) -> list[Detection]`` with GenEval class names, mask-derived boxes and masks.

    Detections at or below ``geneval.THRESHOLD`` (0.3, the lowest rule threshold) and beyond the 16
    best per class are dropped here only to save memory: ``geneval.select_detections`` applies the
    tag's threshold (> 0.3, or > 0.9 for counting) and the same cap again, with the same strict ``>``
    and order, so the verdict is as if every detection were passed on.
    """

    def __init__(
        self, model, processor, *, names: Optional[Sequence[str]] = None, test_scale: Optional[tuple[int, int]] = None
    ):
        """``test_scale`` = (longest, shortest) edge of the test-time resize; default ``TEST_SCALE``,
        mmdet's (1333, 800)."""
        test_scale = TEST_SCALE if test_scale is None else test_scale
        if min(test_scale) < SIZE_DIVISOR:
            raise ValueError(f"test_scale {test_scale} must have both edges ≥ {SIZE_DIVISOR}")
        self.model = model.eval()
        self.processor = processor
        self.test_scale = tuple(test_scale)
        self.names = geneval_names(model.config.id2label, names)

    def preprocess(self, image: Image.Image) -> dict:
        """``pixel_values`` (1, 3, H', W') and ``pixel_mask`` (1, H', W') as mmdet's test pipeline makes
        them: the keep-ratio resize to ``test_scale`` (bilinear without antialiasing, rounded to uint8,
        as mmcv's cv2 ``imrescale``), the processor's normalization, zero padding to multiples of 32."""
        h, w = rescaled_size(*image.size, self.test_scale)
        ph, pw = padded_size(h, w)
        pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None].float()  # (1, 3, H, W)
        pixels = F.interpolate(pixels, size=(h, w), mode="bilinear", align_corners=False, antialias=False)
        resized = pixels.round_().clamp_(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()  # (h, w, 3)
        values = self.processor(images=resized, do_resize=False, return_tensors="pt")["pixel_values"]  # (1, 3, h, w)
        if values.shape[-2:] != (h, w):
            raise ValueError(f"the image processor changed the {w}×{h} input to {tuple(values.shape[-2:])}")
        pixel_mask = torch.zeros(1, ph, pw, dtype=torch.int64)
        pixel_mask[:, :h, :w] = 1
        return {"pixel_values": F.pad(values, (0, pw - w, 0, ph - h)), "pixel_mask": pixel_mask}

    @classmethod
    def from_pretrained(
        cls, model_id_or_dir: str, device: Optional[str] = None, dtype: str | torch.dtype = "float32"
    ) -> "Mask2FormerDetector":
        """Load the model and its image processor from a hub id or a ``save_pretrained`` folder."""
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        device, torch_dtype = default_device(device), parse_dtype(dtype)
        model = Mask2FormerForUniversalSegmentation.from_pretrained(model_id_or_dir, dtype=torch_dtype)
        processor = AutoImageProcessor.from_pretrained(model_id_or_dir)
        return cls(model.to(device), processor)

    @torch.no_grad()
    def __call__(self, image: Image.Image) -> list[Detection]:
        image = image.convert("RGB")
        width, height = image.size
        param = next(self.model.parameters())
        inputs = self.preprocess(image)
        pixel_values = inputs["pixel_values"].to(param.device, param.dtype)
        out = self.model(pixel_values=pixel_values)
        cls_logits = out.class_queries_logits[0].float()  # (Q, K + 1), last = no object
        mask_logits = out.masks_queries_logits[0].float()  # (Q, h, w) at 1/4 of the input

        # The padded input, cropped to the resized image, then resized to the original (mmdet's chain).
        in_h, in_w = pixel_values.shape[-2:]
        valid = inputs["pixel_mask"][0]
        valid_h, valid_w = int(valid.any(dim=1).sum()), int(valid.any(dim=0).sum())
        num_classes = cls_logits.shape[-1] - 1
        probs = cls_logits.softmax(-1)[:, :-1]  # (Q, K)
        scores, flat = probs.flatten().topk(min(MAX_PER_IMAGE, probs.numel()))
        labels, queries = flat % num_classes, flat // num_classes
        # A query's mask does not depend on the class it is paired with: upsample each query once.
        unique, pair_query = queries.unique(return_inverse=True)
        logits = mask_logits[unique][None]  # (1, U, h, w)
        logits = F.interpolate(logits, size=(in_h, in_w), mode="bilinear", align_corners=False)
        logits = logits[..., :valid_h, :valid_w]
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)[0]
        binary = logits > 0  # (U, H, W)
        mask_scores = (logits.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
        det_scores = (scores * mask_scores[pair_query]).tolist()

        detections: list[Detection] = []
        per_class: dict[str, int] = {}
        masks = binary.cpu().numpy()
        for i in sorted(range(len(det_scores)), key=lambda j: -det_scores[j]):
            name = self.names[int(labels[i])]
            if det_scores[i] <= THRESHOLD or per_class.get(name, 0) >= MAX_OBJECTS:
                continue
            per_class[name] = per_class.get(name, 0) + 1
            mask = masks[int(pair_query[i])]
            detections.append(Detection(name, mask_to_box(mask), det_scores[i], mask=mask))
        return detections
