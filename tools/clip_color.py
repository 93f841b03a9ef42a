"""GenEval's colour classifier with transformers CLIP: zero-shot over the 10 colours on a masked crop.

As the official evaluator (open_clip ViT-L-14 ``openai`` + clip_benchmark's zero-shot classifier):
each colour's text embedding is the renormalised mean of the three templates' normalised embeddings,
computed once per object class; the object is its mask composited onto grey #999 and cropped to its
box; the predicted colour is the argmax of the cosine similarity.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from clvr_agent.eval.rules import COLORS, Detection
from clvr_agent.tools.loading import default_device, parse_dtype

BACKGROUND = "#999"
TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")


def crop_on_grey(image: Image.Image, det: Detection) -> Image.Image:
    """The object's mask pasted onto grey #999 (whole image when no mask), cropped to its box.

    PIL rounds the float box to whole pixels, as the official ``image.crop(box[:4])`` does.
    """
    image = image.convert("RGB")
    if det.mask is not None:
        if tuple(det.mask.shape) != (image.height, image.width):
            raise ValueError(f"mask shape {det.mask.shape} does not match the {image.width}×{image.height} image")
        blank = Image.new("RGB", image.size, color=BACKGROUND)
        image = Image.composite(image, blank, Image.fromarray(np.asarray(det.mask, dtype=bool)))
    return image.crop(det.box[:4])


class ClipColorClassifier:
    """``classifier.colors(image, detections)`` → one of :data:`geneval.COLORS` per detection."""

    def __init__(self, model, processor):
        self.model = model.eval()
        self.processor = processor
        self._text: dict[str, torch.Tensor] = {}  # class name -> (D, 10) colour embeddings

    @classmethod
    def from_pretrained(
        cls, model_id_or_dir: str, device: Optional[str] = None, dtype: str | torch.dtype = "float32"
    ) -> "ClipColorClassifier":
        """Load ``CLIPModel`` and its processor (tokenizer + image processor) from a hub id or folder."""
        from transformers import CLIPModel, CLIPProcessor

        device, torch_dtype = default_device(device), parse_dtype(dtype)
        model = CLIPModel.from_pretrained(model_id_or_dir, dtype=torch_dtype)
        return cls(model.to(device), CLIPProcessor.from_pretrained(model_id_or_dir))

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def text_embeddings(self, classname: str) -> torch.Tensor:
        """(D, 10): per colour, the mean of the normalised template embeddings, renormalised."""
        if classname not in self._text:
            texts = [t.format(c=c, cls=classname) for c in COLORS for t in TEMPLATES]
            tokens = self.processor.tokenizer(texts, padding=True, return_tensors="pt").to(self._device())
            emb = self.model.get_text_features(**tokens)
            emb = getattr(emb, "pooler_output", emb).float()  # (10 * 3, D)
            emb = torch.nn.functional.normalize(emb, dim=-1).view(len(COLORS), len(TEMPLATES), -1).mean(1)
            self._text[classname] = torch.nn.functional.normalize(emb, dim=-1).T
        return self._text[classname]

    @torch.no_grad()
    def colors(self, image: Image.Image, detections: Sequence[Detection]) -> list[str]:
        """The colour of each detection (all of one class, as the official code classifies them)."""
        if not detections:
            return []
        crops = [crop_on_grey(image, det) for det in detections]
        pixels = self.processor.image_processor(images=crops, return_tensors="pt")["pixel_values"]
        feats = self.model.get_image_features(pixel_values=pixels.to(self._device(), self.model.dtype))
        feats = torch.nn.functional.normalize(getattr(feats, "pooler_output", feats).float(), dim=-1)  # (N, D)
        out = []
        for det, feat in zip(detections, feats):
            out.append(COLORS[int((feat @ self.text_embeddings(det.cls)).argmax())])
        return out

    def for_image(self, image: Image.Image) -> Callable[[Detection], str]:
        """The ``classify_color`` that :func:`geneval.evaluate_image` takes, bound to ``image``."""
        return lambda det: self.colors(image, [det])[0]
