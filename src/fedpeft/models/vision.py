"""Vision transformers for image classification (``model.head=image_classification``).

The model comes from ``AutoModelForImageClassification`` (a local directory or a hub id such as
``google/vit-base-patch16-224-in21k``; its classifier is new, drawn from the run seed) or is ``tiny-vit``,
a randomly initialised 2-layer ViT on 32x32 images for tests and the offline demo. Its "tokenizer" slot
holds the image processor: the model directory's ``preprocessor_config.json`` when there is one, else a
``ViTImageProcessor`` built offline from the model's ``image_size`` (resize, rescale to [0, 1], normalise
with mean = std = 0.5 as the in21k checkpoints do).

Several tasks with different label sets share one head over the union of their classes (the sorted
distinct labels of the experiment, like text classification). Each example carries the class indices of
its own task, and both the training loss and the evaluation's arg-max are taken over those logits only
(the others are masked to -inf): a CIFAR-10 image is classified among CIFAR-10's ten classes, never
against CIFAR-100's hundred, and the head rows of a task are trained only by that task's examples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from fedpeft.data.experiment import task_class_indices
from fedpeft.data.images import collate_images, encode_images

TINY_VIT = "tiny-vit"
IMAGE_HEAD = "image_classification"

try:  # transformers >= 5 names the PIL backend explicitly (the default one needs torchvision)
    from transformers import ViTImageProcessorPil as _ViTProcessor
except ImportError:  # pragma: no cover - transformers 4
    from transformers import ViTImageProcessor as _ViTProcessor


def vit_processor(image_size: int):
    """The ViT preprocessing built without files: resize to ``image_size`` (bilinear), scale to [0, 1],
    normalise with mean 0.5 and std 0.5 per channel (the values of google/vit-*-in21k)."""
    return _ViTProcessor(size={"height": image_size, "width": image_size}, image_mean=[0.5, 0.5, 0.5],
                         image_std=[0.5, 0.5, 0.5], do_resize=True, do_rescale=True, do_normalize=True)


def image_processor_for(source, model) -> object:
    """The model directory's (or cached hub repo's) ``preprocessor_config.json`` when present, else the
    offline ViT preprocessing at the model's ``image_size``."""
    path = Path(str(source))
    if (path / "preprocessor_config.json").is_file():
        return _ViTProcessor.from_pretrained(path)
    if not path.exists():
        try:
            return _ViTProcessor.from_pretrained(str(source))
        except (OSError, ValueError):
            pass
    return vit_processor(int(model.config.image_size))


def tiny_vit_config(num_labels: int = 2, image_size: int = 32, patch_size: int = 8, hidden_size: int = 32,
                    layers: int = 2):
    """The config of ``tiny-vit``: 32x32 RGB images in 8x8 patches, hidden size 32, 2 layers, 4 heads
    (its weights are drawn from the seed by ``models.registry``)."""
    from transformers import ViTConfig

    return ViTConfig(image_size=image_size, patch_size=patch_size, num_channels=3, hidden_size=hidden_size,
                     num_hidden_layers=layers, num_attention_heads=4, intermediate_size=hidden_size * 2,
                     num_labels=num_labels)


def masked_logits(logits: torch.Tensor, class_mask: torch.Tensor | None) -> torch.Tensor:
    """Logits outside each row's task set to -inf (no change without a mask)."""
    if class_mask is None:
        return logits
    return logits.masked_fill(~class_mask.to(logits.device), float("-inf"))


def image_loss(model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the batch of the model's logits restricted to each example's task."""
    logits = model(pixel_values=batch["pixel_values"]).logits.float()
    return F.cross_entropy(masked_logits(logits, batch.get("class_mask")), batch["labels"].to(logits.device))


def is_image_batch(batch: Mapping) -> bool:
    return "pixel_values" in batch


@torch.no_grad()
def predict_images(model, processor, records: Sequence[dict], classes: Sequence[str], batch_size: int = 64,
                   allowed: Mapping[str, tuple[int, ...]] | None = None) -> tuple[list[int], list[int]]:
    """Arg-max class index (over the record's task classes) of every record, and its gold index."""
    allowed = allowed or task_class_indices(records, classes)
    encoded = encode_images(records, classes, allowed)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    predictions: list[int] = []
    for start in range(0, len(encoded), batch_size):
        batch = collate_images(encoded[start:start + batch_size], processor, len(classes))
        logits = model(pixel_values=batch["pixel_values"].to(device)).logits.float()
        predictions += masked_logits(logits, batch["class_mask"]).argmax(dim=-1).tolist()
    model.train(was_training)
    return predictions, [e.label for e in encoded]

