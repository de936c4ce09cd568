"""The experiment config: one validated pydantic model, loaded from YAML, overridable as ``key.sub=value``.

Every section forbids unknown keys; errors name the key path and suggest the nearest valid key, so a
typo such as ``federation.num_client`` fails before anything is loaded. Scalars are strict: a boolean is
not a number (``federation.rounds=true`` is refused, not read as 1), a number is not a boolean, an
integer field takes no string, and no float may be inf or NaN.
"""

from __future__ import annotations

import difflib
import logging
import re
import types
from pathlib import Path
from collections.abc import Callable
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from fedpeft.alignment.names import DEFAULT_BETA, DEFAULT_REWARD_LOSS, OBJECTIVES, REWARD_LOSS_PARAMS
from fedpeft.metering.schemes import SCHEMES

from fedpeft.evaluation.suite_table import resolve_suite

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key, the value and what was expected."""


SEED_MAX = 2**32 - 1
"""Largest seed every RNG the run seeds accepts (numpy's legacy seeding is 32-bit)."""


def _scalar_kind(annotation: Any) -> type | None:
    """bool, int or float when a field holds exactly that scalar (or None), else None."""
    args = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    kinds = {a for a in args if a is not type(None)}
    return next(iter(kinds)) if len(kinds) == 1 and next(iter(kinds)) in (bool, int, float) else None


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _strict_scalars(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic's lax mode reads true as 1, 1 as true and "3" as 3; a config means none of these.
        Float fields still take numeric strings: YAML reads ``5e-4`` (no dot) as a string."""
        kind = _scalar_kind(cls.model_fields[info.field_name].annotation)
        if value is None or kind is None:
            return value
        if kind is bool and not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {type(value).__name__} {value!r}")
        if kind in (int, float) and isinstance(value, bool):
            raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
        if kind is int and isinstance(value, str):
            raise ValueError(f"expected an integer, got the string {value!r}")
        return value


DEVICE_PATTERN = r"^(auto|cpu|cuda|cuda:\d+)$"


class ModelConfig(_Section):
    name: str = Field(
        "smollm2-135m-instruct",
        description="Bundled name (smollm2-135m-instruct, all-minilm-l6-v2, tiny-llama, tiny-bert, tiny-t5), a local "
        "directory, a .gguf file, "
        "random:<shape> (a randomly initialised model of a real architecture, for throughput work: smollm2-135m, "
        "llama-3.2-1b, llama-2-7b, mistral-7b, or a local config.json), or a Hugging Face id (needs internet).",
    )
    device: str = Field("auto",
                        description="auto (CUDA when available, else CPU), cpu, cuda or cuda:N. Asking for CUDA where there "
                        "is none stops the run before anything loads.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Storage dtype of the frozen base model. Trainable adapter weights stay float32.")
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", description="Quantised frozen base through bitsandbytes (pip install 'fedpeft[gpu]'; CUDA only). "
        "4bit is QLoRA's recipe: NF4, double quantisation, bfloat16 compute.")
    attention: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel (transformers' attn_implementation).")
    revision: str | None = None
    gguf_file: str | None = Field(None, description="GGUF file name inside a local directory or hub repo.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: all cores).")
    head: Literal["causal_lm", "classification", "seq2seq", "image_classification"] = Field(
        "causal_lm", description="causal_lm: generate answers; classification: a sequence-classification head over "
        "the data's distinct targets (encoders such as all-minilm-l6-v2), scored by accuracy; seq2seq: an "
        "encoder-decoder (T5 / Flan-T5, tiny-t5) reads the prompt and generates the answer (a checkpoint whose "
        "config.json sets is_encoder_decoder runs as seq2seq under causal_lm too); image_classification: "
        "a vision transformer (tiny-vit, a ViT directory or hub id) on image records (data.source generated_images "
        "or images), scored by top-1 accuracy (docs/model_families.md).")

    @field_validator("device")
    @classmethod
    def _device_spelling(cls, value: str) -> str:
        # Only the spelling is checked here: whether CUDA exists is a property of the machine, checked
        # when a run starts (fedpeft.models.device.resolve_device), so GPU configs validate on a laptop.
        if not re.match(DEVICE_PATTERN, value):
            raise ValueError("model.device must be auto, cpu, cuda or cuda:N (N a GPU index)")
        return value


PEFT_TYPES = ("lora", "dora", "adalora", "loha", "lokr", "ia3", "prompt_tuning", "p_tuning", "prefix_tuning")
"""Adapter types ``peft.type`` selects, each built by the ``peft`` library (models/peft_wrap.py)."""

PROMPT_LEARNING_TYPES = ("prompt_tuning", "p_tuning", "prefix_tuning")
"""Types that add virtual tokens (or a key/value prefix) instead of changing any base weight."""

_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
DEFAULT_TARGET_MODULES = tuple(_LORA_TARGETS)
"""The targets a config fills in when peft.target_modules is not given (an encoder-decoder such as T5 gets
its architecture's own instead: models/peft_wrap.seq2seq_targets)."""

PEFT_OPTION_TYPES: dict[str, tuple[str, ...]] = {
    "r": ("lora", "dora", "loha", "lokr"),
    "alpha": ("lora", "dora", "adalora", "loha", "lokr"),
    "dropout": ("lora", "dora", "adalora"),
    "rslora": ("lora", "dora"),
    "target_modules": ("lora", "dora", "adalora", "loha", "lokr", "ia3"),
    "feedforward_modules": ("ia3",),
    "init_r": ("adalora",),
    "target_r": ("adalora",),
    "tinit": ("adalora",),
    "tfinal": ("adalora",),
    "delta_t": ("adalora",),
    "orth_reg_weight": ("adalora",),
    "decompose_both": ("lokr",),
    "decompose_factor": ("lokr",),
    "num_virtual_tokens": PROMPT_LEARNING_TYPES,
    "prompt_init": ("prompt_tuning",),
    "prompt_init_text": ("prompt_tuning",),
    "encoder_hidden_size": ("p_tuning", "prefix_tuning"),
    "encoder_reparameterization": ("p_tuning",),
    "encoder_dropout": ("p_tuning",),
    "prefix_projection": ("prefix_tuning",),
}
"""Which ``peft.type`` each option belongs to (``type`` itself belongs to all). An option of another type
is an error naming the option and its types; an option of this type left out takes its default here."""

_PEFT_DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": {"r": 8, "alpha": 16.0, "dropout": 0.0, "rslora": False, "target_modules": _LORA_TARGETS},
    "dora": {"r": 8, "alpha": 16.0, "dropout": 0.0, "rslora": False, "target_modules": _LORA_TARGETS},
    "adalora": {"alpha": 16.0, "dropout": 0.0, "target_modules": _LORA_TARGETS, "init_r": 12, "target_r": 8,
                "tinit": 0, "tfinal": 0, "delta_t": 1, "orth_reg_weight": 0.5},
    "loha": {"r": 8, "alpha": 16.0, "target_modules": _LORA_TARGETS},
    "lokr": {"r": 8, "alpha": 16.0, "target_modules": _LORA_TARGETS, "decompose_both": False, "decompose_factor": -1},
    "ia3": {},  # target and feed-forward modules: peft's defaults for the architecture unless given
    "prompt_tuning": {"num_virtual_tokens": 20, "prompt_init": "random"},
    "p_tuning": {"num_virtual_tokens": 20, "encoder_hidden_size": 128, "encoder_reparameterization": "MLP",
                 "encoder_dropout": 0.0},
    "prefix_tuning": {"num_virtual_tokens": 20, "prefix_projection": False},
}


class PeftConfig(_Section):
    """The adapter: ``type`` and that type's options (``PEFT_OPTION_TYPES`` says which type owns which
    option; ``fedpeft`` passes them to the ``peft`` library's config of that type). An option of another
    type is refused; an option of this type that is left out (or null) takes the type's default, so a
    saved ``config.yaml`` (every key, null where unused) loads back as it was."""

    type: Literal["lora", "dora", "adalora", "loha", "lokr", "ia3", "prompt_tuning", "p_tuning", "prefix_tuning"] = Field(
        "lora", description="Adapter type, built by peft: lora, dora (weight-decomposed LoRA), adalora (adaptive "
        "rank, allocated locally by each client), loha, lokr, ia3, prompt_tuning, p_tuning, prefix_tuning.")
    r: int | None = Field(None, ge=1, description="Rank (lora, dora, loha, lokr; default 8).")
    alpha: float | None = Field(None, gt=0, description="Scaling numerator (lora, dora, adalora, loha, lokr; default 16).")
    dropout: float | None = Field(None, ge=0, lt=1, description="Dropout on the adapter's input (lora, dora, adalora; default 0).")
    target_modules: list[str] | None = Field(
        None, description="Modules to adapt (lora, dora, adalora, loha, lokr: default q/k/v/o_proj; ia3: default peft's "
        "per-architecture list).")
    rslora: bool | None = Field(None, description="rsLoRA scaling alpha/sqrt(r) (lora, dora; default false).")
    feedforward_modules: list[str] | None = Field(
        None, description="ia3: the target modules whose input (not output) is scaled; a subset of target_modules "
        "(default: peft's for the architecture, or none when target_modules is given).")
    init_r: int | None = Field(None, ge=1, description="adalora: initial rank of every module (default 12).")
    target_r: int | None = Field(None, ge=1, description="adalora: average rank after allocation (default 8).")
    tinit: int | None = Field(None, ge=0, description="adalora: local steps before pruning starts (default 0).")
    tfinal: int | None = Field(None, ge=0, description="adalora: last local steps at the final budget (default 0).")
    delta_t: int | None = Field(None, ge=1, description="adalora: local steps between two allocations (default 1).")
    orth_reg_weight: float | None = Field(None, ge=0, description="adalora: weight of the orthogonality loss (default 0.5).")
    decompose_both: bool | None = Field(None, description="lokr: also factor the left Kronecker factor (default false).")
    decompose_factor: int | None = Field(None, description="lokr: Kronecker factor size (-1: peft's choice; default -1).")
    num_virtual_tokens: int | None = Field(None, ge=1, description="prompt_tuning, p_tuning, prefix_tuning: virtual "
                                           "tokens (default 20).")
    prompt_init: Literal["random", "text"] | None = Field(
        None, description="prompt_tuning: virtual token embeddings drawn at random or from prompt_init_text's tokens.")
    prompt_init_text: str | None = Field(None, description="prompt_tuning with prompt_init=text: the text.")
    encoder_hidden_size: int | None = Field(None, ge=1, description="p_tuning: the prompt encoder's hidden size "
                                            "(default 128); prefix_tuning with prefix_projection: the projection's.")
    encoder_reparameterization: Literal["MLP", "LSTM"] | None = Field(
        None, description="p_tuning: the prompt encoder (default MLP).")
    encoder_dropout: float | None = Field(None, ge=0, lt=1, description="p_tuning: dropout in the prompt encoder (default 0).")
    prefix_projection: bool | None = Field(None, description="prefix_tuning: reparameterise the prefix through an MLP "
                                           "(default false).")

    @model_validator(mode="before")
    @classmethod
    def _options_of_the_type(cls, data: Any) -> Any:
        """Refuse options of another type (naming the types they belong to), then fill this type's defaults."""
        if not isinstance(data, dict):
            return data
        kind = data.get("type", "lora")
        if kind not in PEFT_TYPES:
            return data  # the Literal's error names the valid types
        data = dict(data)
        wrong = [key for key, value in data.items()
                 if value is not None and key in PEFT_OPTION_TYPES and kind not in PEFT_OPTION_TYPES[key]]
        if wrong:
            raise ValueError("; ".join(
                f"peft.{key} is an option of peft.type {', '.join(PEFT_OPTION_TYPES[key])}, not of '{kind}' "
                f"(got {data[key]!r}; remove it or change peft.type)" for key in wrong))
        for key, value in _PEFT_DEFAULTS[kind].items():
            if data.get(key) is None:
                data[key] = list(value) if isinstance(value, list) else value
        if kind == "ia3" and data.get("target_modules") is not None and data.get("feedforward_modules") is None:
            data["feedforward_modules"] = []
        if kind == "prefix_tuning" and data.get("prefix_projection") and data.get("encoder_hidden_size") is None:
            data["encoder_hidden_size"] = 128
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "PeftConfig":
        if self.type == "adalora" and self.target_r > self.init_r:
            raise ValueError(f"peft.target_r ({self.target_r}) must be at most peft.init_r ({self.init_r})")
        if self.type == "ia3" and self.target_modules is not None:
            extra = [m for m in self.feedforward_modules or [] if m not in self.target_modules]
            if extra:
                raise ValueError(f"peft.feedforward_modules {extra} must also be in peft.target_modules {self.target_modules}")
        if self.type == "prefix_tuning" and not self.prefix_projection and self.encoder_hidden_size is not None:
            raise ValueError("peft.encoder_hidden_size is used by prefix_tuning only with peft.prefix_projection=true")
        if self.type == "prompt_tuning" and (self.prompt_init == "text") != (self.prompt_init_text is not None):
            raise ValueError("peft.prompt_init_text is required with peft.prompt_init=text, and only then")
        return self

    @property
    def is_prompt_learning(self) -> bool:
        return self.type in PROMPT_LEARNING_TYPES


class PartitionConfig(_Section):
    kind: Literal["iid", "dirichlet", "task_dirichlet", "pathological", "natural", "quantity_skew"] = "dirichlet"
    alpha: float = Field(0.5, description="Dirichlet concentration; must be > 0.")
    min_frac: float = Field(0.0, ge=0, lt=1, description="Dirichlet proportions below this are zeroed.")
    classes_per_client: int = Field(2, ge=1, description="For kind=pathological.")
    by: str = Field("task", description="Record field whose values are the labels/categories/tasks.")

    @field_validator("alpha")
    @classmethod
    def _alpha_positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError(f"Dirichlet alpha must be > 0, got {value}")
        return value


class DataConfig(_Section):
    source: str = Field("generated", description="'generated' (built-in multi-task set), a built-in dataset name, or a file path.")
    path: str | None = Field(None, description="Local file or directory for a built-in dataset name.")
    tasks: list[str] = Field(
        default_factory=lambda: ["arithmetic", "reverse", "unit_conversion", "uppercase"],
        description="Generated tasks to include (source=generated).",
    )
    train_examples_per_task: int = Field(400, ge=1)
    eval_examples_per_task: int = Field(30, ge=1)
    template: Literal["chat", "alpaca", "plain"] = "chat"
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    columns: dict[str, str] = Field(default_factory=dict, description="Column mapping source->field.")
    fieldnames: list[str] | None = Field(
        None, description="Column names of a CSV/TSV without a header row (training and evaluation files); every "
        "row, the first included, is then a record. Without it the first row is the header.")
    split: str = Field("train", description="Split of a built-in dataset to train on.")
    eval_split: str | None = Field(None, description="Evaluation split (default: the dataset's own, else a seeded hold-out).")
    eval_source: str | None = Field(None, description="The dataset to evaluate on: a local file or directory (its records "
                                    "are the evaluation set, named like the training task unless they have a 'task' field), "
                                    "a built-in name or a hub id (with data.eval_split).")
    task: str | None = Field(None, description="Task type for plain files (instruction, gsm8k, commonsense, mmlu, classification, math).")
    task_options: dict[str, Any] = Field(default_factory=dict, description="Task options, e.g. {shots: 5}, or for "
                                         "classification label_words, text_field, label_field, instruction, head_instruction.")
    max_train_examples_per_task: int | None = Field(None, ge=1, description="Cap training records per task/label.")
    add_generated: list[str] = Field(
        default_factory=list, description="Generated tasks added to a dataset source (train/eval_examples_per_task "
        "records each), e.g. [sentiment, topic, parity] beside SST-2 for a multi-task classification scenario.")


class RobustConfig(_Section):
    """Robust aggregation for adversarial settings (federation/robust.py): applied to the round's
    updates before the method aggregates them, like a server optimizer is applied after."""

    rule: Literal["none", "median", "trimmed_mean", "krum", "multi_krum"] = Field(
        "none", description="median / trimmed_mean: coordinate-wise over the clients' tensors; krum / multi_krum: "
        "keep the update(s) closest to their n-f-2 nearest neighbours (Blanchard et al. 2017).")
    trim_fraction: float = Field(0.1, ge=0, lt=0.5, description="trimmed_mean: fraction cut at each end per coordinate.")
    byzantine: int = Field(0, ge=0, description="krum / multi_krum: f, the number of attackers tolerated; "
                           "needs clients_per_round > 2f + 2.")
    krum_select: int | None = Field(None, ge=1, description="multi_krum: updates kept (default n - f).")
    clip_norm: float | None = Field(None, gt=0, description="Clip each update's change from the global state to "
                                    "this L2 norm before the rule (norm clipping; null disables).")


class FederationConfig(_Section):
    num_clients: int = Field(10, ge=1)
    clients_per_round: int = Field(2, ge=1)
    rounds: int = Field(5, ge=1)
    local_steps: int = Field(10, ge=1)
    batch_size: int = Field(8, ge=1)
    grad_accumulation: int = Field(1, ge=1)
    uplink_compression: Literal[SCHEMES] = Field(
        "none", description="Wire compression of client updates, encoded on the client (the update minus the "
        "tensors it received is encoded).")
    max_update_norm: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="Drop a client whose update differs from the global state by more than this L2 norm; null: no bound.")
    max_client_examples: int | None = Field(
        None, ge=1, description="Largest num_examples a client may report (its aggregation weight); null: the "
        "examples it holds in the server's partition (set it when Flower nodes bring their own data).")
    robust: RobustConfig = Field(default_factory=RobustConfig)
    concurrent_clients: int = Field(
        1, ge=1, description="Train up to this many of a round's clients at once, in one batched forward/backward "
        "over the shared model with per-sample adapter routing (federation/batched_runner.py); results equal "
        "serial training to float tolerance. 1: one after another. Methods or models that cannot batch exactly "
        "train serially (said once in the log).")
    max_tokens_per_pass: int | None = Field(
        None, ge=1, description="With concurrent_clients > 1: cap a batched pass at this many tokens (each client "
        "counts batch_size x training.max_seq_len), so groups shrink to fit memory; null: groups of "
        "concurrent_clients.")
    devices: int | list[str] | None = Field(
        None, description="One worker process per device, each with its own model copy, the round's clients "
        "spread over them (federation/devices.py): a CUDA device count, or a list such as [cuda:0, cuda:1] or "
        "[cpu, cpu]; null: train in the engine's process on model.device.")

    @field_validator("devices")
    @classmethod
    def _devices_named(cls, value):
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise ValueError(f"federation.devices={value}: a device count must be >= 1")
        if isinstance(value, list):
            if not value:
                raise ValueError("federation.devices=[]: give at least one device (or null)")
            for name in value:
                if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
                    raise ValueError(f"federation.devices: '{name}' is not a device; expected cpu, cuda or cuda:N")
        return value

    @model_validator(mode="after")
    def _sampled_le_total(self) -> "FederationConfig":
        if self.clients_per_round > self.num_clients:
            raise ValueError(
                f"federation.clients_per_round={self.clients_per_round} exceeds "
                f"federation.num_clients={self.num_clients}"
            )
        robust = self.robust
        if robust.rule in ("krum", "multi_krum") and self.clients_per_round <= 2 * robust.byzantine + 2:
            raise ValueError(
                f"federation.robust.rule={robust.rule} with byzantine={robust.byzantine} needs clients_per_round > "
                f"{2 * robust.byzantine + 2}, got {self.clients_per_round}")
        if robust.krum_select is not None and robust.krum_select > self.clients_per_round:
            raise ValueError(f"federation.robust.krum_select={robust.krum_select} exceeds clients_per_round="
                             f"{self.clients_per_round}")
        return self


class ServerOptimizerConfig(_Section):
    """A rule of ``strategies/server_optimizers.py``; hyperparameters left null take the rule's default
    (``fedpeft methods`` lists the rules and their defaults). Checked with the method section."""

    name: str = Field("none", description="Server optimizer rule (none, fedavgm, fedadagrad, fedadam, fedyogi; "
                      "see `fedpeft methods`).")
    lr: float | None = Field(None, gt=0, description="Server learning rate eta_s (null: the rule's default).")
    beta1: float | None = Field(None, ge=0, lt=1, description="First-moment decay (null: the rule's default).")
    beta2: float | None = Field(None, ge=0, lt=1, description="Second-moment decay (null: the rule's default).")
    tau: float | None = Field(None, gt=0, description="Adaptivity epsilon added to sqrt(v) (null: the rule's default).")


class MethodConfig(_Section):
    name: str = Field("fedit", description="Federated method; see `fedpeft methods`.")
    server_optimizer: ServerOptimizerConfig = Field(default_factory=ServerOptimizerConfig)
    options: dict[str, Any] = Field(default_factory=dict, description="Method-specific options, validated by the "
                                    "method's own options model (see `fedpeft methods NAME`).")


class TrainingConfig(_Section):
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0, description="Client learning rate at round 1.")
    lr_min: float = Field(1e-5, ge=0, description="Client learning rate at the last round (cosine); <= lr.")
    schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm (> 0); null disables.")
    max_seq_len: int = Field(128, ge=8)
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="fp32, or bf16: forward/backward under bfloat16 autocast (CPU or CUDA); the trainable "
        "adapter weights and the optimizer state stay float32 (the master copy).")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less activation memory, about a third more compute.")
    keep_optimizer: bool = Field(
        False, description="Keep each client's local optimizer state (AdamW moments, SGD momentum) across the rounds "
        "it is sampled, per local adapter, in its client store (so a resumed run continues it exactly); false: a "
        "fresh optimizer every round.")

    objective: Literal[OBJECTIVES] = Field(
        "sft", description="sft: the model's own language-modelling loss; reward: a scalar-head reward model "
        "(model.head=classification) trained on preference pairs with training.loss; dpo / ipo: the LoRA policy "
        "against the frozen base (adapters disabled) as reference, with training.beta. reward/dpo/ipo read "
        "preference records (prompt, chosen, rejected; see docs/alignment.md).")
    loss: str | None = Field(None, description=f"objective=reward: the pairwise loss ({', '.join(REWARD_LOSS_PARAMS)}); "
                             f"default {DEFAULT_REWARD_LOSS}.")
    loss_params: dict[str, float] = Field(default_factory=dict, description="objective=reward: the loss's parameters, "
                                          "e.g. {margin: 0.5} (see docs/alignment.md for each loss's parameters).")
    beta: float | None = Field(None, gt=0, description=f"objective=dpo/ipo: strength of the pull towards the reference "
                               f"(default {DEFAULT_BETA}).")

    @model_validator(mode="after")
    def _lr_min_le_lr(self) -> "TrainingConfig":
        if self.schedule == "cosine" and self.lr_min > self.lr:
            raise ValueError(f"training.lr_min={self.lr_min} exceeds training.lr={self.lr}: the cosine schedule "
                             "decays from lr to lr_min")
        return self

    @model_validator(mode="after")
    def _objective_keys(self) -> "TrainingConfig":
        """training.loss / loss_params belong to objective=reward, training.beta to dpo/ipo; a loss name or
        parameter that does not exist is refused with the valid ones."""
        if self.objective != "reward" and (self.loss is not None or self.loss_params):
            raise ValueError(f"training.loss / training.loss_params select the reward-model loss; they need "
                             f"training.objective=reward (got objective={self.objective})")
        if self.objective not in ("dpo", "ipo") and self.beta is not None:
            raise ValueError(f"training.beta is DPO/IPO's strength; it needs training.objective=dpo or ipo "
                             f"(got objective={self.objective})")
        if self.loss is not None and self.loss not in REWARD_LOSS_PARAMS:
            raise ValueError(f"training.loss={self.loss!r} is not a reward loss; valid: {', '.join(REWARD_LOSS_PARAMS)}")
        valid = REWARD_LOSS_PARAMS[self.reward_loss]
        for key in self.loss_params:
            if key not in valid:
                raise ValueError(f"training.loss_params: {key!r} is not a parameter of loss {self.reward_loss!r}; "
                                 f"valid: {', '.join(valid) or 'none (it has no parameters)'}")
        return self

    @property
    def reward_loss(self) -> str:
        """The reward loss in effect (``training.loss`` or its default)."""
        return self.loss or DEFAULT_REWARD_LOSS

    @property
    def preference_beta(self) -> float:
        """DPO/IPO's beta in effect (``training.beta`` or its default)."""
        return self.beta if self.beta is not None else DEFAULT_BETA


class EvaluationConfig(_Section):
    every_rounds: int = Field(0, ge=0, description="Evaluate the global model every E rounds (0: only at the end).")
    before_training: bool = Field(True, description="Also evaluate the base model before round 1.")
    max_new_tokens: int = Field(16, ge=1)
    batch_size: int = Field(32, ge=1)
    max_examples: int | None = Field(None, ge=1, description="Evaluate on a seeded sample of at most this many records "
                                     "per group (task, or group_by), the same records in every evaluation, final included.")
    group_by: str | None = Field(None, description="Record field to report metrics by (default: the record's task; "
                                 "e.g. 'category' for Dolly). Records without the field fall back to their task.")
    personal_max_clients: int | None = Field(
        None, ge=1, description="Personalised methods (FedSA-LoRA, local-only): evaluate at most this many clients' "
        "own adapters at the end, a seeded sample (None: every client).")
    finetune_steps: int = Field(0, ge=0, description="Local fine-tuning after federation: at the end, each evaluated "
                                "client (all, or evaluation.personal_max_clients of them) fine-tunes the final global "
                                "adapter this many steps on its own data and is scored on the evaluation records of its "
                                "labels; reported as finetuned/mean, std, min, max beside the global model (0: off).")
    finetune_lr: float | None = Field(None, gt=0, description="Learning rate of that fine-tuning (default: the last "
                                      "round's client learning rate).")
    suites: list[str] = Field(default_factory=list, description="Benchmark suites (commonsense8, mmlu, gsm8k, ...) run on "
                              "the final global model; 'mmlu:validation' picks a split (MMLU's default is test).")
    suite_limit: int | None = Field(None, ge=1, description="Examples per suite task, a seeded sample stratified by "
                                    "MMLU subject (None: all).")

    @field_validator("suites")
    @classmethod
    def _known_suites(cls, value: list[str]) -> list[str]:
        for entry in value:  # checked here, not after training: a typo must not cost a run
            resolve_suite(entry)
        return value


class OutputConfig(_Section):
    dir: str = Field("runs", description="Parent directory of run directories.")
    run_name: str | None = Field(None, description="Run directory name (default: <name>-<timestamp>).")
    keep_checkpoints: int = Field(2, ge=1)
    progress: bool = True
    report: bool = Field(True, description="Write RUN_DIR/report/report.md with plots at the end of the run.")
    live_loggers: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="Also stream metrics to TensorBoard / Weights & Biases when installed.")


class AdaptiveClippingConfig(_Section):
    """Quantile-based adaptive clipping (Andrew et al. 2021): the clip norm follows a target quantile of
    the clients' update norms, from a noisy count of unclipped updates."""

    enabled: bool = Field(False, description="Adapt privacy.clip_norm (its value is the initial C) every round.")
    target_quantile: float = Field(0.5, gt=0, lt=1, description="gamma: the fraction of updates that should be unclipped.")
    lr: float = Field(0.2, gt=0, description="eta_C of the geometric update C <- C exp(-eta_C (b - gamma)).")
    count_noise_std: float | None = Field(
        None, gt=0, description="sigma_b, the std of the noise on the count of unclipped updates (null: "
        "clients_per_round / 20, the paper's choice); must exceed noise_multiplier / 2.")


class DPSGDConfig(_Section):
    """Record-level DP: DP-SGD through Opacus in every client's local training (per-sample gradient
    clipping and Gaussian noise on the trainable adapter parameters)."""

    enabled: bool = False
    noise_multiplier: float = Field(1.0, gt=0, description="sigma of DP-SGD: noise std / max_grad_norm.")
    max_grad_norm: float = Field(1.0, gt=0, description="Per-sample gradient clipping norm.")
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of each client's record-level guarantee; must be below "
                         "1 / (records of the largest client).")


class PrivacyConfig(_Section):
    """Differential privacy (docs/privacy.md). ``mode: none`` with ``dp_sgd.enabled: false`` (the default)
    changes nothing."""

    mode: Literal["none", "central", "distributed", "local"] = Field(
        "none", description="Client-level DP-FedAvg: central (the server noises the sum of clipped updates), "
        "distributed (each client adds its share of that noise; with SecAgg+ the server never sees an "
        "un-noised sum), local (each client noises its own update), or none.")
    clip_norm: float = Field(1.0, gt=0, description="C: each client's update (trained minus start) is clipped to this L2 norm.")
    noise_multiplier: float | None = Field(
        None, gt=0, description="z: the sum's noise std is z C. Null: calibrated from target_epsilon.")
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of the (epsilon, delta) reported; must be below 1 / num_clients.")
    target_epsilon: float | None = Field(
        None, gt=0, description="Set z so that the planned rounds spend this epsilon (instead of noise_multiplier).")
    max_epsilon: float | None = Field(
        None, gt=0, description="Budget: the run stops (with a message) before a round that would exceed it.")
    reproducible_noise: bool = Field(
        True, description="Clients draw their noise from seeds derived from the run seed (runs repeat and resume "
        "exactly). Whoever knows the seed can remove that noise: set false for a deployment (fresh OS randomness).")
    adaptive_clipping: AdaptiveClippingConfig = Field(default_factory=AdaptiveClippingConfig)
    dp_sgd: DPSGDConfig = Field(default_factory=DPSGDConfig)

    @property
    def client_level(self) -> bool:
        return self.mode != "none"

    @property
    def enabled(self) -> bool:
        return self.client_level or self.dp_sgd.enabled


METHOD_CHECKS: list[Callable[[Any], None]] = []
"""Checks of the method section run on every validated config. The method registry adds its own when
``fedpeft.strategies`` is imported (every command that runs a method imports it; the config does not
import the strategies, which import torch, so ``fedpeft partition`` / ``fedpeft data`` stay light)."""


IMAGE_HEAD = "image_classification"
IMAGE_GENERATED_SOURCE, IMAGE_DATASET_SOURCE = "generated_images", "images"
IMAGE_PEFT_TYPES = ("lora", "dora", "loha", "lokr")
"""Adapter types of ``model.head=image_classification`` (models/peft_wrap.py builds them; prompt learning
needs token embeddings)."""

class ExperimentConfig(_Section):
    name: str = "experiment"
    seed: int = Field(0, ge=0, le=SEED_MAX, description=f"Seed of every random choice; 0..{SEED_MAX}.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    peft: PeftConfig = Field(default_factory=PeftConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)

    @model_validator(mode="after")
    def _privacy_section(self) -> "ExperimentConfig":
        """Client-level DP settings that depend on the federation (delta < 1/N, one way to set z)."""
        p, n = self.privacy, self.federation.num_clients
        if not p.client_level:
            return self
        if p.delta >= 1 / n:
            raise ValueError(f"privacy.delta={p.delta} must be below 1 / federation.num_clients = {1 / n:.4g} "
                             "(client-level DP: a delta of 1/N allows one client's data to be released outright)")
        if (p.noise_multiplier is None) == (p.target_epsilon is None):
            raise ValueError(f"privacy.mode={p.mode} needs exactly one of privacy.noise_multiplier (got "
                             f"{p.noise_multiplier}) and privacy.target_epsilon (got {p.target_epsilon})")
        if p.target_epsilon is not None and p.max_epsilon is not None and p.target_epsilon > p.max_epsilon:
            raise ValueError(f"privacy.target_epsilon={p.target_epsilon} exceeds privacy.max_epsilon={p.max_epsilon}")
        if p.adaptive_clipping.enabled and p.mode != "central":
            raise ValueError(f"privacy.adaptive_clipping.enabled=true needs privacy.mode=central, got {p.mode}: the "
                             "count of unclipped updates travels in clear, which distributed and local DP do not allow")
        return self

    @model_validator(mode="after")
    def _objective_head(self) -> "ExperimentConfig":
        """A reward model is a scalar head (model.head=classification with one output); DPO/IPO train the
        causal LM itself."""
        objective, head = self.training.objective, self.model.head
        if objective == "reward" and head != "classification":
            raise ValueError("training.objective=reward trains a scalar-head reward model: set model.head=classification "
                             f"(got model.head={head})")
        if objective in ("dpo", "ipo") and head != "causal_lm":
            raise ValueError(f"training.objective={objective} trains the language model itself: set model.head=causal_lm "
                             f"(got model.head={head})")
        return self

    @model_validator(mode="after")
    def _image_head(self) -> "ExperimentConfig":
        """An image classifier reads image records, takes a weight adapter on its attention projections, and
        has no text to generate: the combinations that cannot work are refused here, naming the field."""
        head, name, source = self.model.head, self.model.name, self.data.source
        image_sources = (IMAGE_GENERATED_SOURCE, IMAGE_DATASET_SOURCE)
        if head != IMAGE_HEAD:
            if name == "tiny-vit":
                raise ValueError(f"model.name=tiny-vit is an image classifier: set model.head={IMAGE_HEAD} (got "
                                 f"model.head={head})")
            if source in image_sources:
                raise ValueError(f"data.source={source} holds images: set model.head={IMAGE_HEAD} (got model.head={head})")
            return self
        if source not in image_sources:
            raise ValueError(f"data.source: model.head={IMAGE_HEAD} reads image records: '{IMAGE_GENERATED_SOURCE}' "
                             f"or '{IMAGE_DATASET_SOURCE}' (data.tasks naming the datasets), got '{source}'")
        if name in ("tiny-llama", "tiny-bert", "smollm2-135m-instruct", "smollm2", "all-minilm-l6-v2", "minilm") \
                or name.startswith("random:"):
            raise ValueError(f"model.name={name} is a text model; model.head={IMAGE_HEAD} needs a vision transformer "
                             "(tiny-vit, a ViT directory or hub id such as google/vit-base-patch16-224-in21k)")
        if self.peft.type not in IMAGE_PEFT_TYPES:
            raise ValueError(f"peft.type={self.peft.type}: model.head={IMAGE_HEAD} takes {', '.join(IMAGE_PEFT_TYPES)} "
                             "(prompt learning prepends token embeddings, which a vision transformer has not)")
        if self.evaluation.suites:
            raise ValueError(f"evaluation.suites={list(self.evaluation.suites)}: the suites are text benchmarks; "
                             f"model.head={IMAGE_HEAD} is evaluated by top-1 accuracy on the image tasks")
        if self.privacy.dp_sgd.enabled:
            raise ValueError(f"privacy.dp_sgd.enabled=true is not supported with model.head={IMAGE_HEAD} (its per-example "
                             "loss reads token inputs); client-level DP (privacy.mode) applies")
        return self

    @model_validator(mode="after")
    def _method_section(self, info: ValidationInfo) -> "ExperimentConfig":
        """The method registry checks the method section: a registered name, options its model accepts, a
        server optimizer rule with only its own hyperparameters, a supported peft.type. Skipped with
        ``check_method=False`` (commands that never run a method: partition, data)."""
        if info.context is not None and not info.context.get("check_method", True):
            return self
        for check in METHOD_CHECKS:
            check(self)
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _valid_keys(model_cls: type[BaseModel], path: tuple[str, ...]) -> list[str]:
    """Field names at ``path`` inside ``model_cls`` (empty when the path leaves the schema)."""
    cls: Any = model_cls
    for part in path:
        field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None:
            return []
        cls = field.annotation
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return list(cls.model_fields)
    return []


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        loc = tuple(str(p) for p in item["loc"])
        key = ".".join(loc) or "<root>"
        error_lines = getattr(item.get("ctx", {}).get("error"), "lines", None)
        if error_lines:  # the method registry's errors already name the key, the value and the expectation
            lines.extend(error_lines)
        elif item["type"] == "extra_forbidden":
            valid = _valid_keys(ExperimentConfig, loc[:-1])
            guess = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{'.'.join(loc[:-1] + (guess[0],))}'?" if guess else ""
            lines.append(f"unknown key '{key}'{hint} (valid keys here: {', '.join(valid)})")
        else:
            value = item.get("input")
            msg = item["msg"].removeprefix("Value error, ")
            lines.append(f"{key}: {msg}" if isinstance(value, dict) else f"{key}: {msg} (got {value!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``federation.rounds=3`` -> (['federation', 'rounds'], 3). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value {raw!r} is not valid YAML ({exc})") from exc
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``key.sub=value``. Switching ``method.name`` to another method drops the options the
    config had for the previous one (``configs/fltac_generated.yaml method.name=fedit`` is the baseline);
    ``method.options.*`` overrides then apply to the new method."""
    for text in overrides:
        path, value = parse_override(text)
        method = data.get("method")
        if (path == ["method", "name"] and isinstance(method, dict) and method.get("name") != value
                and method.get("options")):
            log.info("method.name=%s: dropping method.options of '%s' (%s)", value, method.get("name"),
                     ", ".join(sorted(method["options"])))
            method.pop("options")
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' holds a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def build_config(data: dict[str, Any], check_method: bool = True) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(data, context={"check_method": check_method})
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                check_method: bool = True) -> ExperimentConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``key.sub=value`` overrides.
    ``check_method=False`` leaves the method section to be checked when a strategy is built (for
    commands that never run one; it keeps torch out of them)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[:exc.start].count(b"\n") + 1
            raise ConfigError(f"config file '{path}' is not UTF-8 text: line {line} holds byte "
                              f"0x{raw[exc.start]:02x} ({exc.reason})") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from exc
        if loaded is None:
            raise ConfigError(f"config file '{path}' is empty: give at least the keys that differ from the "
                              "defaults (see configs/tiny.yaml), or omit --config to use every default")
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping at the top level, got {type(loaded).__name__}")
        data = loaded
    return build_config(apply_overrides(data, list(overrides or [])), check_method=check_method)
