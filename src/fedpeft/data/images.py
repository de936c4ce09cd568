"""Image classification data (``model.head=image_classification``).

An image record is ``{"task", "image", "output"}``: ``image`` an RGB array (H x W x 3 uint8), a PIL image,
a file path or a ``datasets`` image dict; ``output`` its label (a string); ``task`` the task it belongs to.
Partitioners read labels from records as for text (``data.partition.by``: ``task`` for FL-TAC's per-task
split, ``output`` for a label-skewed Dirichlet split).

Two sources:

* ``data.source: generated_images``: tasks fedpeft draws itself, deterministic from the seed, no files
  (tests and the offline demo). 32x32 RGB images on a noisy uniform background:
  ``shapes`` (a filled square, circle or triangle: its label), ``stripes`` (stripes at one of four
  orientations), ``quadrants`` (which quadrant is bright). Their label sets are disjoint.
* ``data.source: images``: each entry of ``data.tasks`` is a dataset: ``cifar10`` / ``cifar100`` (the hub
  ids ``uoft-cs/cifar10`` / ``uoft-cs/cifar100``), another hub id, or a local directory that
  ``datasets.load_dataset`` reads (parquet files with an image and a class-label column, or an image
  folder with one sub-folder per class). Training split ``data.split`` (train), evaluation split
  ``data.eval_split`` (default test). The image column is the first ``Image`` feature (or
  ``data.task_options.image_field``), the label column ``label``, else ``fine_label`` (CIFAR-100's 100
  classes), else the first ``ClassLabel`` (or ``data.task_options.label_field``); labels are its class names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedpeft.data.experiment import ExperimentData
from fedpeft.data.sources import DataError, open_hub_dataset
from fedpeft.seeding import derive_seed

GENERATED_SOURCE = "generated_images"
DATASET_SOURCE = "images"
IMAGE_SIZE = 32

IMAGE_DATASETS = {"cifar10": "uoft-cs/cifar10", "cifar100": "uoft-cs/cifar100"}
"""Built-in image dataset names -> their Hugging Face Hub ids (FL-TAC's image scenario, seed 001)."""


# --- generated tasks ------------------------------------------------------------------------------------
def _canvas(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A noisy uniform background and a foreground colour at least 120 away from it (max over channels)."""
    background = rng.integers(0, 256, size=3)
    while True:
        colour = rng.integers(0, 256, size=3)
        if np.abs(colour - background).max() >= 120:
            break
    image = np.broadcast_to(background, (IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.int16)
    return image, colour


def _finish(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noise = rng.integers(-12, 13, size=image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def _shapes(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    label = ("square", "circle", "triangle")[rng.integers(3)]
    image, colour = _canvas(rng)
    size = int(rng.integers(12, 25))
    top, left = (int(v) for v in rng.integers(0, IMAGE_SIZE - size + 1, size=2))
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    if label == "square":
        inside = np.ones((size, size), dtype=bool)
    elif label == "circle":
        inside = (ys - size / 2) ** 2 + (xs - size / 2) ** 2 <= (size / 2) ** 2
    else:  # right triangle: the lower-left half of the box
        inside = xs <= ys
    region = image[top:top + size, left:left + size]
    region[inside] = colour
    return _finish(image, rng), label


_ORIENTATIONS = ("horizontal", "vertical", "diagonal", "antidiagonal")


def _stripes(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    label = _ORIENTATIONS[rng.integers(4)]
    image, colour = _canvas(rng)
    period, phase = int(rng.integers(4, 9)), int(rng.integers(0, 8))
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    coordinate = {"horizontal": ys, "vertical": xs, "diagonal": ys + xs, "antidiagonal": ys - xs}[label]
    image[((coordinate + phase) % period) < period // 2] = colour
    return _finish(image, rng), label


_QUADRANTS = ("top_left", "top_right", "bottom_left", "bottom_right")


def _quadrants(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    index = int(rng.integers(4))
    dark = rng.integers(0, 90, size=3)
    image = np.broadcast_to(dark, (IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.int16)
    half = IMAGE_SIZE // 2
    row, col = divmod(index, 2)
    image[row * half:(row + 1) * half, col * half:(col + 1) * half] = rng.integers(170, 256, size=3)
    return _finish(image, rng), _QUADRANTS[index]


GENERATORS: dict[str, Callable[[np.random.Generator], tuple[np.ndarray, str]]] = {
    "shapes": _shapes, "stripes": _stripes, "quadrants": _quadrants}
"""Generated image task -> its generator (one image and its label from the given random stream)."""

GENERATED_LABELS = {"shapes": ("circle", "square", "triangle"), "stripes": _ORIENTATIONS, "quadrants": _QUADRANTS}


def generate_image_task(task: str, count: int, seed: int, split: str) -> list[dict]:
    """``count`` records of a generated image task, from a stream seeded by (seed, task, split)."""
    if task not in GENERATORS:
        raise ValueError(f"data.tasks: '{task}' is not a generated image task; valid: {', '.join(GENERATORS)}")
    rng = np.random.default_rng(derive_seed(seed, "images", task, split))
    records = []
    for _ in range(count):
        image, label = GENERATORS[task](rng)
        records.append({"task": task, "image": image, "output": label})
    return records


def generate_image_split(tasks: list[str], train_per_task: int, eval_per_task: int, seed: int) -> tuple[list[dict], list[dict]]:
    train = [r for task in tasks for r in generate_image_task(task, train_per_task, seed, "train")]
    evaluation = [r for task in tasks for r in generate_image_task(task, eval_per_task, seed, "eval")]
    return train, evaluation


# --- datasets (hub ids or local directories) ------------------------------------------------------------
def _columns(dataset, where: str, options: dict) -> tuple[str, str, list[str] | None]:
    """(image column, label column, the label column's class names or None)."""
    import datasets

    features = dataset.features
    image = options.get("image_field") or next(
        (name for name, f in features.items() if isinstance(f, datasets.Image)), None)
    if image is None or image not in features:
        raise DataError(f"{where}: no image column (columns: {list(features)}); set data.task_options.image_field")
    label = options.get("label_field") or next(
        (name for name in ("label", "fine_label") if name in features), None) or next(
        (name for name, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    if label is None or label not in features:
        raise DataError(f"{where}: no label column (columns: {list(features)}); set data.task_options.label_field")
    names = features[label].names if isinstance(features[label], datasets.ClassLabel) else None
    return image, label, names


def dataset_task_name(entry: str) -> str:
    """The task name of a ``data.tasks`` entry: a built-in name itself, else the last path / id part."""
    return entry if entry in IMAGE_DATASETS else Path(entry.rstrip("/")).name


def load_image_dataset(entry: str, split: str, limit: int | None, options: dict) -> list[dict]:
    """Records of one image dataset split (at most ``limit``, the first ones)."""
    source = IMAGE_DATASETS.get(entry, entry)
    local = Path(source).expanduser()
    if str(source).startswith((".", "/", "~")) and not local.exists():
        raise DataError(f"data.tasks: local image dataset '{source}' does not exist")
    dataset = open_hub_dataset(str(local) if local.exists() else source, None, split,
                               what="its directory" if local.exists() else "the Hugging Face Hub",
                               offline_hint="name their local directory in data.tasks (parquet files with an image "
                               "and a label column, or an image folder)")
    where = f"image dataset '{entry}' split {split!r}"
    image, label, names = _columns(dataset, where, options)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    task = dataset_task_name(entry)
    records = []
    for row in dataset:
        value = row[label]
        records.append({"task": task, "image": row[image], "output": names[value] if names else str(value)})
    if not records:
        raise DataError(f"{where} has no records")
    return records


def load_image_data(config) -> ExperimentData:
    """The training and evaluation records of an image config (``data.source`` generated_images or images)."""
    data = config.data
    if data.source == GENERATED_SOURCE:
        train, evaluation = generate_image_split(list(data.tasks), data.train_examples_per_task,
                                                 data.eval_examples_per_task, config.seed)
        info = {"source": GENERATED_SOURCE, "eval_split": "generated"}
    elif data.source == DATASET_SOURCE:
        train, evaluation = [], []
        for entry in data.tasks:
            train += load_image_dataset(entry, data.split, data.max_train_examples_per_task, dict(data.task_options))
            evaluation += load_image_dataset(entry, data.eval_split or "test", None, dict(data.task_options))
        info = {"source": DATASET_SOURCE, "datasets": {dataset_task_name(t): IMAGE_DATASETS.get(t, t) for t in data.tasks},
                "eval_split": data.eval_split or "test"}
    else:
        raise ValueError(f"data.source: model.head=image_classification reads '{GENERATED_SOURCE}' or "
                         f"'{DATASET_SOURCE}' (with data.tasks naming the datasets), got '{data.source}'")
    info["label_sets"] = {task: {c: c for c in sorted({r["output"] for r in train if r["task"] == task})}
                          for task in dict.fromkeys(r["task"] for r in train)}
    return ExperimentData(train=train, evaluation=evaluation, label_field=data.partition.by, scorer="accuracy",
                          info=info)


# --- examples and batches ---------------------------------------------------------------------------------
@dataclass
class EncodedImage:
    """One training or evaluation image: the RGB array (uint8, H x W x 3; preprocessed per batch, so a
    CIFAR set at 224 x 224 never sits in memory as float tensors), its class index in the experiment's
    class list, and the class indices of its task (the logits the loss and the arg-max may use)."""

    image: np.ndarray
    label: int
    allowed: tuple[int, ...]


def as_rgb_array(image) -> np.ndarray:
    """A record's ``image`` (a PIL image, an array H x W x 3 / H x W, a ``{"bytes"|"path"}`` dict as
    ``datasets`` stores images, or a file path) as a uint8 RGB array."""
    from PIL import Image

    if isinstance(image, Mapping):
        if image.get("bytes") is not None:
            import io

            image = Image.open(io.BytesIO(image["bytes"]))
        elif image.get("path"):
            image = image["path"]
        else:
            raise ValueError("an image record's 'image' dict has neither 'bytes' nor 'path'")
    if isinstance(image, (str, Path)):
        image = Image.open(image)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"an image must be H x W x 3 (RGB) or H x W (grey), got shape {array.shape}")
    return array.astype(np.uint8, copy=False)


def encode_images(records: Sequence[dict], classes: Sequence[str],
                  allowed: Mapping[str, tuple[int, ...]]) -> list[EncodedImage]:
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for r in records:
        label = str(r["output"])
        if label not in index:
            raise ValueError(f"image record label {label!r} is not one of the classes {list(classes)[:10]}")
        out.append(EncodedImage(as_rgb_array(r["image"]), index[label], allowed[str(r["task"])]))
    return out


def collate_images(examples: Sequence[EncodedImage], processor, num_classes: int) -> dict[str, torch.Tensor]:
    """A batch: ``pixel_values`` from the processor, ``labels`` (class indices) and ``class_mask``
    (batch x classes, true where the example's task has that class)."""
    pixels = processor(images=[e.image for e in examples], return_tensors="pt")["pixel_values"]
    mask = torch.zeros((len(examples), num_classes), dtype=torch.bool)
    for row, e in enumerate(examples):
        mask[row, list(e.allowed)] = True
    return {"pixel_values": pixels, "labels": torch.tensor([e.label for e in examples]), "class_mask": mask}
