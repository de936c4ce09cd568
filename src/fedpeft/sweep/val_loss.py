"""Validation loss of a finished trial: the run's final adapter on the run's own evaluation records.

The engine's ``eval`` events score generated answers (exact match, accuracy, ...); they log no loss. A
sweep reports both, because the two can rank trials differently, so the loss is computed here once per
finished trial: the supervised-token mean cross-entropy (completion-only, as in training) over the
evaluation records, or the classification head's mean cross-entropy (an image classifier's: over the
logits of each image's task, as its clients trained).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from fedpeft.config import ExperimentConfig
from fedpeft.data.dataset import encode_for_experiment, load_experiment_data
from fedpeft.data.encoding import collate
from fedpeft.data.images import collate_images
from fedpeft.federation.local_trainer import label_shift, supervised_count
from fedpeft.models.device import resolve_device
from fedpeft.models.peft_wrap import load_experiment_model, set_base_weights
from fedpeft.models.vision import image_loss


@torch.no_grad()
def mean_loss(model, batches, loss_fn=None) -> float:
    """Token-weighted mean of the model's loss (or ``loss_fn(model, batch)``) over ``batches`` (each batch's
    mean loss times its number of supervised targets), so the result does not depend on the batch size."""
    total, count = 0.0, 0
    for batch in batches:
        n = supervised_count(batch["labels"], label_shift(model))
        if n == 0:
            continue
        total += float(loss_fn(model, batch) if loss_fn is not None else model(**batch).loss) * n
        count += n
    return total / count if count else math.nan


def validation_loss(config: ExperimentConfig, run_dir: str | Path, batch_size: int = 16) -> float:
    final = Path(run_dir) / "final"
    data = load_experiment_data(config)
    device = resolve_device(config.model.device)
    loaded, model = load_experiment_model(config, data, device=device)
    set_peft_model_state_dict(model, load_file(str(final / "adapter_model.safetensors")))
    if (final / "base_weights.safetensors").is_file():
        set_base_weights(model, load_file(str(final / "base_weights.safetensors")))
    model.eval()
    encoded, _ = encode_for_experiment(config, data, data.evaluation, loaded.tokenizer)
    kept = [e for e in encoded if e is not None]
    if config.model.head == "image_classification":  # loaded.tokenizer is the image processor
        batches = ({k: v.to(device) for k, v in collate_images(kept[i:i + batch_size], loaded.tokenizer,
                                                               len(data.classes())).items()}
                   for i in range(0, len(kept), batch_size))
        return mean_loss(model, batches, loss_fn=image_loss)
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else loaded.tokenizer.eos_token_id
    batches = ({k: v.to(device) for k, v in collate(kept[i:i + batch_size], pad).items()}
               for i in range(0, len(kept), batch_size))
    return mean_loss(model, batches)
