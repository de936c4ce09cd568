"""Preference objectives (``training.objective`` = reward | dpo | ipo) in an experiment: the data, its
encoding into (chosen, rejected) pairs, the local loss and the held-out evaluation.

- Data (``load_preference_data``): ``data.source=generated`` is the generated preference set
  (``preference.generated_preferences`` over ``data.tasks``, ``train/eval_examples_per_task`` pairs per
  task); any other source is a preference file or Hub name (``preference.load_preferences`` with
  ``data.columns`` and ``data.split``), evaluated on ``data.eval_source`` when given, else on a seeded
  hold-out of ``data.eval_examples_per_task`` pairs. A record missing prompt/chosen/rejected fails here,
  before any model loads. Records without a ``task`` field are labelled ``preference`` (their partition
  label when ``data.partition.by=task``).
- Encoding (``encode_preference_records``): ``dpo.encode_pair`` with ``data.template``; a pair whose
  completion cannot fit in ``training.max_seq_len`` is dropped (and counted).
- Loss (``objective_from_config``): ``objectives.PreferenceObjective`` with ``training.loss`` /
  ``loss_params`` (reward) or ``training.beta`` (dpo/ipo); the local trainer calls it in place of the LM loss.
- Evaluation (``preference_eval``): ``objectives.evaluate_pairs`` on the held-out pairs, in the shape
  of the other evaluators' results. Metrics: reward -> ``pairwise_accuracy`` (headline), ``reward_margin``,
  ``pair_loss``; dpo/ipo -> ``preference_accuracy`` (headline; the implicit rewards
  ``β·(log π - log π_ref)``), ``reward_margin``, ``pair_loss``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

from fedpeft.alignment.dpo import collate_pairs, encode_pair
from fedpeft.alignment.objectives import PreferenceObjective, evaluate_pairs
from fedpeft.alignment.preference import generated_preferences, load_preferences
from fedpeft.data.encoding import EncodedExample
from fedpeft.data.experiment import ExperimentData
from fedpeft.data.sources import DataError

DEFAULT_LABEL = "preference"

Pair = tuple[EncodedExample, EncodedExample]


def is_preference(config) -> bool:
    return config.training.objective != "sft"


def load_preference_data(config) -> ExperimentData:
    """Training and held-out preference records of a config whose objective is reward/dpo/ipo."""
    data = config.data
    if data.source == "generated":
        train, held_out = generated_preferences(list(data.tasks), data.train_examples_per_task,
                                                data.eval_examples_per_task, config.seed)
        info = {"source": "generated preferences", "eval_split": "generated"}
    else:
        records = load_preferences(data.path or data.source, columns=data.columns or None, split=data.split)
        if data.eval_source is not None:
            train = records
            held_out = load_preferences(data.eval_source, columns=data.columns or None,
                                        split=data.eval_split or data.split)
            info = {"source": data.source, "eval_split": data.eval_source}
        else:
            n = data.eval_examples_per_task
            if n >= len(records):
                raise DataError(f"data.eval_examples_per_task={n}: '{data.source}' holds {len(records)} preference "
                                f"records, too few to hold {n} out for evaluation (give data.eval_source, or fewer)")
            order = list(range(len(records)))
            random.Random(f"{config.seed}:preference-holdout").shuffle(order)
            held = set(order[:n])
            train = [r for i, r in enumerate(records) if i not in held]
            held_out = [r for i, r in enumerate(records) if i in held]
            info = {"source": data.source, "eval_split": f"seeded hold-out of {n}"}
    for record in (*train, *held_out):
        record.setdefault("task", DEFAULT_LABEL)
    info.update(objective=config.training.objective, train_pairs=len(train), eval_pairs=len(held_out))
    return ExperimentData(train=train, evaluation=held_out, label_field=data.partition.by, info=info)


def encode_preference_records(config, records: Sequence[dict], tokenizer) -> tuple[list[Pair | None], int]:
    """(chosen, rejected) encodings of each record (None where either completion does not fit), and how
    many were dropped."""
    encoded = [encode_pair(r, tokenizer, config.data.template, config.training.max_seq_len) for r in records]
    return encoded, sum(e is None for e in encoded)


def objective_from_config(config) -> PreferenceObjective | None:
    """The local loss of ``training.objective`` (None for sft: the model's own LM loss)."""
    training = config.training
    if training.objective == "sft":
        return None
    if training.objective == "reward":
        return PreferenceObjective("reward", loss=training.reward_loss, loss_params=dict(training.loss_params))
    return PreferenceObjective(training.objective, beta=training.preference_beta)


def metric_names(kind: str) -> tuple[str, str, str]:
    """(accuracy, margin, loss) metric names of an objective's evaluation."""
    accuracy = "pairwise_accuracy" if kind == "reward" else "preference_accuracy"
    return accuracy, "reward_margin", "pair_loss"


def preference_eval(model, tokenizer, objective: PreferenceObjective, records: Sequence[dict], config,
                    max_examples: int | None = None) -> dict:
    """Held-out pairs scored with ``objective`` (pairwise accuracy, mean reward margin, mean loss), in the
    result shape of ``generation_eval`` (metrics, headline, examples, seconds, samples)."""
    start = time.perf_counter()
    records = list(records)[:max_examples] if max_examples else list(records)
    encoded, dropped = encode_preference_records(config, records, tokenizer)
    pairs = [p for p in encoded if p is not None]
    if not pairs:
        raise ValueError(f"no held-out preference pair fits in training.max_seq_len={config.training.max_seq_len} "
                         f"({dropped} dropped)")
    device = next(model.parameters()).device
    size = config.evaluation.batch_size
    batches = ({k: v.to(device) for k, v in collate_pairs(pairs[i:i + size], tokenizer.pad_token_id).items()}
               for i in range(0, len(pairs), size))
    scores = evaluate_pairs(model, objective, batches)
    accuracy, margin, loss = metric_names(objective.kind)
    metrics = {accuracy: scores["pairwise_accuracy"], margin: scores["reward_margin"], loss: scores["loss"]}
    return {"metrics": metrics, "headline": accuracy, "examples": scores["pairs"], "dropped": dropped,
            "seconds": time.perf_counter() - start, "samples": []}

