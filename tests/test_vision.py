"""Vision transformers for image classification (model.head=image_classification): FL-TAC's image scenario
(seed 001: ViT + CIFAR-10/100, LoRA r=4 on the query and value projections) on a tiny random ViT and the
generated image tasks; CIFAR's loading code against a local parquet fixture."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

peft = pytest.importorskip("peft")

from fedpeft.adapters import adapter_parameters, get_adapter_state, set_adapter_state  # noqa: E402
from fedpeft.config import ConfigError, PeftConfig, load_config  # noqa: E402
from fedpeft.data.images import (GENERATED_LABELS, collate_images, encode_images, generate_image_task,  # noqa: E402
                                 load_image_dataset)
from fedpeft.data.sources import DataError  # noqa: E402
from fedpeft.evaluation.classification import image_classification_eval  # noqa: E402
from fedpeft.federation.batched_runner import batching_refusal  # noqa: E402
from fedpeft.federation.engine import run_experiment  # noqa: E402
from fedpeft.models.peft_wrap import wrap_peft  # noqa: E402
from fedpeft.models.registry import ModelNotFoundError, load_base_model  # noqa: E402
from fedpeft.models.vision import image_loss, vit_processor  # noqa: E402
from fedpeft.strategies.fedit import FedIT  # noqa: E402
from fedpeft.strategies.registry import registered  # noqa: E402

CONFIG = "configs/vit/generated_images.yaml"
PEFT = PeftConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
HEAD = "image_classification"


def _overrides(method: str, tasks=("shapes", "quadrants"), rounds: int = 2) -> list[str]:
    return [f"data.tasks=[{','.join(tasks)}]", "data.train_examples_per_task=24", "data.eval_examples_per_task=6",
            "data.partition.min_frac=0.0", "federation.num_clients=3", "federation.clients_per_round=3",
            f"federation.rounds={rounds}", "federation.local_steps=2", "federation.batch_size=8",
            f"method.name={method}", f"evaluation.every_rounds={rounds}", "model.threads=1", "output.progress=false",
            "output.report=false"] + ([f"method.options.num_tasks={len(tasks)}", "method.options.min_task_examples=1"]
                                      if method == "fltac" else [])


def _events(run_dir, kind):
    return [e for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if e["event"] == kind]


def _batch(records, classes, allowed):
    return collate_images(encode_images(records, classes, allowed), vit_processor(32), len(classes))


# --- the model, its preprocessing and its loss ------------------------------------------------------
def test_preprocessing_is_rescale_and_normalise_at_the_models_size():
    records = generate_image_task("stripes", 3, seed=0, split="train")
    classes = list(GENERATED_LABELS["stripes"])
    batch = _batch(records, sorted(classes), {"stripes": (0, 1, 2, 3)})
    by_hand = torch.stack([torch.from_numpy(r["image"]).permute(2, 0, 1).float() / 255 for r in records])
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert torch.allclose(batch["pixel_values"], (by_hand - 0.5) / 0.5, atol=1e-5)
    assert batch["labels"].tolist() == [sorted(classes).index(r["output"]) for r in records]


def test_tiny_vit_loss_is_the_cross_entropy_of_its_logits_masked_to_the_task():
    model = load_base_model("tiny-vit", seed=0, head=HEAD, num_labels=7).model
    assert (model.config.image_size, model.config.patch_size, model.config.hidden_size,
            model.config.num_hidden_layers) == (32, 8, 32, 2)
    records = generate_image_task("shapes", 5, 0, "train") + generate_image_task("quadrants", 5, 0, "train")
    classes = sorted({r["output"] for r in records} | set(GENERATED_LABELS["shapes"]) | set(GENERATED_LABELS["quadrants"]))
    allowed = {t: tuple(classes.index(c) for c in GENERATED_LABELS[t]) for t in ("shapes", "quadrants")}
    batch = _batch(records, classes, allowed)
    with torch.no_grad():
        logits = model(pixel_values=batch["pixel_values"]).logits.double()
        masked = image_loss(model, batch)
        unmasked = image_loss(model, {k: v for k, v in batch.items() if k != "class_mask"})
        own = model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
    # by hand: -(z_y - log sum_{c in the task's classes} exp z_c), averaged over the batch
    rows = []
    for row, r in enumerate(records):
        ids = list(allowed[r["task"]])
        rows.append(-(logits[row, classes.index(r["output"])] - torch.logsumexp(logits[row, ids], dim=0)))
    assert masked.item() == pytest.approx(torch.stack(rows).mean().item(), abs=1e-5)
    full = [-(logits[i, classes.index(r["output"])] - torch.logsumexp(logits[i], 0)) for i, r in enumerate(records)]
    assert unmasked.item() == pytest.approx(torch.stack(full).mean().item(), abs=1e-5)
    assert unmasked.item() == pytest.approx(own.item(), abs=1e-5)  # the model's own loss without a mask
    assert masked.item() < unmasked.item()  # fewer competing classes


def test_tiny_vit_is_seeded():
    a = load_base_model("tiny-vit", seed=3, head=HEAD, num_labels=4).model.state_dict()
    b = load_base_model("tiny-vit", seed=3, head=HEAD, num_labels=4).model.state_dict()
    c = load_base_model("tiny-vit", seed=4, head=HEAD, num_labels=4).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["classifier.weight"], c["classifier.weight"])


def test_lora_on_query_value_with_the_classifier_trained_and_saved(tmp_path):
    model = wrap_peft(load_base_model("tiny-vit", seed=0, head=HEAD, num_labels=5).model, PEFT, seed=0, head=HEAD)
    params = adapter_parameters(model)
    lora = sorted(k for k in params if "lora_" in k)
    head = sorted(k for k in params if "lora_" not in k)
    assert len(lora) == 2 * 2 * 2 and all(("q_proj" in k or "v_proj" in k) for k in lora)  # layers x q,v x (A,B)
    assert head == ["base_model.model.classifier.modules_to_save.default.bias",
                    "base_model.model.classifier.modules_to_save.default.weight"]
    state = {k: v + 0.01 * torch.randn_like(v) for k, v in get_adapter_state(model).items()}  # B != 0: LoRA acts
    set_adapter_state(model, state)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(load_base_model("tiny-vit", seed=0, head=HEAD, num_labels=5).model,
                                              str(tmp_path / "adapter"))
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model.eval(), reloaded.eval()
    with torch.no_grad():
        assert torch.equal(model(pixel_values=pixels).logits, reloaded(pixel_values=pixels).logits)
    with pytest.raises(ValueError, match=r"peft.target_modules=\['query', 'value'\] matched no layer.*'q_proj'"):
        wrap_peft(load_base_model("tiny-vit", head=HEAD, num_labels=5).model,
                  PeftConfig(r=4, target_modules=["query", "value"]), seed=0, head=HEAD)


def test_a_vit_directory_loads_with_a_new_seeded_head_and_its_processor(tmp_path):
    saved = load_base_model("tiny-vit", seed=1, head=HEAD, num_labels=5)
    saved.model.save_pretrained(tmp_path / "vit")
    proc = vit_processor(32)
    proc.image_mean = [0.25, 0.5, 0.75]  # the directory's own preprocessing must be the one used
    proc.save_pretrained(tmp_path / "vit")
    loaded = load_base_model(str(tmp_path / "vit"), seed=7, head=HEAD, num_labels=3)
    again = load_base_model(str(tmp_path / "vit"), seed=7, head=HEAD, num_labels=3)
    mine, theirs = loaded.model.state_dict(), saved.model.state_dict()
    assert loaded.model.classifier.out_features == 3
    assert all(torch.equal(mine[k], theirs[k]) for k in mine if not k.startswith("classifier."))
    assert torch.equal(mine["classifier.weight"], again.model.state_dict()["classifier.weight"])
    assert list(loaded.tokenizer.image_mean) == [0.25, 0.5, 0.75]


def test_hub_vit_offline_is_a_model_not_found_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError) as err:
        load_base_model("google/vit-base-patch16-224-in21k", head=HEAD, num_labels=10)
    assert "'google/vit-base-patch16-224-in21k'" in str(err.value) and "tiny-vit" in str(err.value)


# --- data -----------------------------------------------------------------------------------------
def _quadrant(image):
    half = image.shape[0] // 2
    means = [image[r * half:(r + 1) * half, c * half:(c + 1) * half].mean() for r in (0, 1) for c in (0, 1)]
    return ("top_left", "top_right", "bottom_left", "bottom_right")[int(np.argmax(means))]


def _orientation(image):
    x = image.astype(float)
    change = {"horizontal": np.abs(x[:, 1:] - x[:, :-1]).mean(),        # along a row: constant for horizontal
              "vertical": np.abs(x[1:, :] - x[:-1, :]).mean(),
              "diagonal": np.abs(x[1:, :-1] - x[:-1, 1:]).mean(),      # y + x constant
              "antidiagonal": np.abs(x[1:, 1:] - x[:-1, :-1]).mean()}  # y - x constant
    return min(change, key=change.get)


def _shape(image):
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(int)
    background = np.median(border, axis=0)
    mask = np.abs(image.astype(int) - background).max(axis=2) > 60
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return "square" if fill > 0.93 else "circle" if fill > 0.68 else "triangle"


@pytest.mark.parametrize("task, rule", [("quadrants", _quadrant), ("stripes", _orientation), ("shapes", _shape)])
def test_generated_images_are_deterministic_and_labelled_by_their_rule(task, rule):
    records = generate_image_task(task, 60, seed=5, split="train")
    again = generate_image_task(task, 60, seed=5, split="train")
    other = generate_image_task(task, 60, seed=6, split="train")
    assert all(np.array_equal(a["image"], b["image"]) and a["output"] == b["output"] for a, b in zip(records, again))
    assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(records, other))
    assert all(r["image"].shape == (32, 32, 3) and r["image"].dtype == np.uint8 for r in records)
    assert [rule(r["image"]) for r in records] == [r["output"] for r in records]
    assert {r["output"] for r in records} == set(GENERATED_LABELS[task])  # every class occurs in 60 draws


def _parquet_dataset(root, name, label_column, names, sizes=(("train", 9), ("test", 4))):
    datasets = pytest.importorskip("datasets")
    folder = root / name
    folder.mkdir()
    features = datasets.Features({"img": datasets.Image(), label_column: datasets.ClassLabel(names=names)})
    for split, n in sizes:
        images = [np.full((8, 8, 3), 10 * i, dtype=np.uint8) for i in range(n)]
        datasets.Dataset.from_dict({"img": images, label_column: [i % len(names) for i in range(n)]},
                                   features=features).to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    return folder


def test_image_datasets_load_from_a_local_directory_with_their_class_names(tmp_path):
    ten = _parquet_dataset(tmp_path, "cifar_like10", "label", ["airplane", "cat", "ship"])
    hundred = _parquet_dataset(tmp_path, "cifar_like100", "fine_label", ["apple", "bear", "cup", "oak", "rose"])
    train = load_image_dataset(str(ten), "train", None, {})
    assert [r["output"] for r in train] == ["airplane", "cat", "ship"] * 3 and {r["task"] for r in train} == {"cifar_like10"}
    assert np.asarray(train[4]["image"])[0, 0].tolist() == [40, 40, 40]
    assert len(load_image_dataset(str(hundred), "test", None, {})) == 4
    assert [r["output"] for r in load_image_dataset(str(hundred), "train", 6, {})] == ["apple", "bear", "cup", "oak", "rose", "apple"]
    # the whole config path: two datasets with label sets of 3 and 5 classes -> one head of 8, masked per task
    cfg = load_config(CONFIG, ["data.source=images", f"data.tasks=[{ten},{hundred}]"])
    from fedpeft.data.dataset import load_experiment_data

    data = load_experiment_data(cfg)
    assert len(data.train) == 18 and len(data.evaluation) == 8 and len(data.classes()) == 8
    assert {t: len(ids) for t, ids in data.task_classes().items()} == {"cifar_like10": 3, "cifar_like100": 5}


def test_cifar_by_hub_name_offline_is_a_clear_error(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"'uoft-cs/cifar10' split 'train'.*local directory in data.tasks"):
        load_image_dataset("cifar10", "train", None, {})


# --- evaluation ------------------------------------------------------------------------------------
class _BrightnessModel(torch.nn.Module):
    """Logits c * mean(pixels) for class c: a bright image (mean > 0) picks its task's highest class index,
    a dark one its lowest."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.arange(classes, dtype=torch.float32))

    def forward(self, pixel_values):
        return type("Out", (), {"logits": pixel_values.mean(dim=(1, 2, 3))[:, None] * self.scale[None, :]})()


def test_accuracy_is_over_each_tasks_own_classes():
    classes = ["a0", "a1", "a2", "b0", "b1"]
    bright, dark = np.full((32, 32, 3), 250, np.uint8), np.full((32, 32, 3), 5, np.uint8)
    records = [{"task": "A", "image": bright, "output": "a2"}, {"task": "A", "image": dark, "output": "a0"},
               {"task": "A", "image": dark, "output": "a1"}, {"task": "B", "image": bright, "output": "b1"},
               {"task": "B", "image": dark, "output": "b1"}]
    # by hand: A bright -> a2 (right), A dark -> a0 (right, then wrong), B bright -> b1 (right; unmasked it
    # would be b1 too), B dark -> b0 (wrong; unmasked it would be a0)
    model = _BrightnessModel(len(classes))
    model.train()
    result = image_classification_eval(model, vit_processor(32), records, classes, batch_size=2,
                                       allowed={"A": (0, 1, 2), "B": (3, 4)})
    assert model.training  # the mode is restored
    assert result["metrics"] == {"A/accuracy": pytest.approx(2 / 3), "B/accuracy": 0.5, "accuracy": 0.6}
    assert result["headline"] == "accuracy" and result["examples"] == 5
    assert [s["predicted"] for s in result["samples"]] == ["a2", "a0", "a0", "b1", "b0"]


# --- federated runs ----------------------------------------------------------------------------------
class RecordingFedIT(FedIT):
    """FedIT that keeps the uploads it averaged and the result."""

    name = "recording_fedit_vit"
    rounds: list = []

    def aggregate(self, round_idx, global_state, updates):
        result = super().aggregate(round_idx, global_state, updates)
        RecordingFedIT.rounds.append(([({k: v.clone() for k, v in u.tensors.items()}, u.num_examples) for u in updates],
                                      {k: v.clone() for k, v in result.global_state.items()}))
        return result


def test_fedit_on_tiny_vit_averages_the_clients_adapters_and_reloads(tmp_path):
    RecordingFedIT.rounds = []
    with registered(RecordingFedIT):
        summary = run_experiment(CONFIG, _overrides("recording_fedit_vit"), run_dir=tmp_path / "run")
    assert len(RecordingFedIT.rounds) == 2
    for uploads, after in RecordingFedIT.rounds:
        assert len(uploads) == 3 and any("classifier" in k for k in after)
        total = sum(n for _, n in uploads)
        for key in after:  # FedAvg, recomputed in float64: LoRA factors and the classifier alike
            expected = sum(t[key].double() * (n / total) for t, n in uploads)
            assert torch.allclose(after[key].double(), expected, rtol=0, atol=1e-6), key
    evals = [e for e in _events(tmp_path / "run", "eval") if "split" not in e]
    assert set(evals[-1]["metrics"]) == {"accuracy", "shapes/accuracy", "quadrants/accuracy"}
    assert all(0 <= v <= 1 for v in evals[-1]["metrics"].values())
    trains = _events(tmp_path / "run", "client_train")
    assert len(trains) == 6 and all(np.isfinite(e["loss"]) for e in trains)
    # the final adapter reloads with peft onto a fresh tiny-vit (7 classes: 3 shapes + 4 quadrants)
    trained = RecordingFedIT.rounds[-1][1]
    reloaded = peft.PeftModel.from_pretrained(load_base_model("tiny-vit", seed=0, head=HEAD, num_labels=7).model,
                                              str(summary.final_adapter_dir))
    assert get_adapter_state(reloaded).keys() == trained.keys()
    assert all(torch.equal(get_adapter_state(reloaded)[k], trained[k]) for k in trained)
    # a sweep's validation loss of this run: the task-masked cross-entropy over the evaluation images, by hand
    from fedpeft.data.dataset import load_experiment_data
    from fedpeft.sweep.val_loss import validation_loss

    cfg = load_config(CONFIG, _overrides("fedit"))
    data = load_experiment_data(cfg)
    classes, allowed = data.classes(), data.task_classes()
    reloaded.eval()
    with torch.no_grad():
        logits = reloaded(pixel_values=_batch(data.evaluation, classes, allowed)["pixel_values"]).logits.double()
    by_hand = [-(logits[i, classes.index(r["output"])] - torch.logsumexp(logits[i, list(allowed[r["task"]])], 0))
               for i, r in enumerate(data.evaluation)]
    assert validation_loss(cfg, tmp_path / "run", batch_size=5) == pytest.approx(torch.stack(by_hand).mean().item(),
                                                                                 abs=1e-5)


def test_fltac_clusters_adapters_of_two_image_tasks_with_different_label_sets(tmp_path):
    run_experiment(CONFIG, _overrides("fltac", tasks=("shapes", "stripes")), run_dir=tmp_path / "run")
    aggregates = _events(tmp_path / "run", "aggregate")
    assert len(aggregates) == 2 and all(0.0 <= a["cluster_accuracy"] <= 1.0 for a in aggregates)
    per_task = [e for e in _events(tmp_path / "run", "eval") if e.get("split") == "task_adapters"]
    assert set(per_task[-1]["metrics"]) == {"task_adapters/shapes/accuracy", "task_adapters/stripes/accuracy",
                                            "task_adapters/accuracy"}


def test_concurrent_clients_fall_back_to_serial_for_images():
    cfg = load_config(CONFIG, ["federation.concurrent_clients=2", "method.name=fedit"])
    model = wrap_peft(load_base_model("tiny-vit", head=HEAD, num_labels=11).model, PEFT, seed=0, head=HEAD)
    assert "model.head=image_classification" in batching_refusal(model, FedIT(options={}), cfg)


# --- refusals before any model loads ---------------------------------------------------------------
@pytest.mark.parametrize("overrides, needle", [
    (["method.name=sfl"], "method.name=sfl is refused with model.head=image_classification: split learning"),
    (["method.name=fedot"], "method.name=fedot is refused with model.head=image_classification: offsite tuning"),
    (["method.name=fedkseed"], "method.name=fedkseed is refused with model.head=image_classification"),
    (["method.name=fedgpl"], "method.name=fedgpl is refused with model.head=image_classification"),
    (["peft.type=prompt_tuning", "peft.r=null", "peft.alpha=null", "peft.dropout=null", "peft.rslora=null",
      "peft.target_modules=null", "method.name=fedit"], "peft.type=prompt_tuning: model.head=image_classification takes"),
    (["data.source=generated"], "data.source: model.head=image_classification reads image records"),
    (["model.name=tiny-llama"], "model.name=tiny-llama is a text model"),
    (["evaluation.suites=[gsm8k]"], "evaluation.suites=['gsm8k']: the suites are text benchmarks"),
    (["privacy.dp_sgd.enabled=true"], "privacy.dp_sgd.enabled=true is not supported with model.head=image_classification"),
    (["training.objective=dpo"], "training.objective=dpo trains the language model itself"),
    (["model.head=causal_lm"], "model.name=tiny-vit is an image classifier: set model.head=image_classification"),
])
def test_text_only_settings_are_refused_naming_the_field(overrides, needle, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr("fedpeft.models.registry.load_base_model", no_model)
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, overrides)
    assert needle in str(err.value)


def test_image_sources_need_the_image_head():
    with pytest.raises(ConfigError, match="data.source=generated_images holds images: set model.head=image_classification"):
        load_config("configs/tiny.yaml", ["data.source=generated_images"])


def test_the_cifar_scenario_config_validates_offline_with_the_seed_settings():
    cfg = load_config("configs/vit/cifar_fltac.yaml")
    assert (cfg.model.name, cfg.model.head) == ("google/vit-base-patch16-224-in21k", HEAD)
    assert (cfg.peft.r, cfg.training.lr, cfg.federation.batch_size, cfg.federation.local_steps,
            cfg.federation.rounds, cfg.federation.num_clients, cfg.seed) == (4, 1e-3, 64, 50, 20, 10, 42)
    assert cfg.data.tasks == ["cifar10", "cifar100"] and cfg.method.options["num_tasks"] == 2
    assert load_config("configs/vit/cifar_fltac.yaml", ["method.name=fedit", "method.options={}"]).method.name == "fedit"
