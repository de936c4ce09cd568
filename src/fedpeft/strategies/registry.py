"""The method registry: every strategy module registers its class where it is defined.

A method is one class (a ``Strategy`` subclass) decorated with :func:`register_method`. The class
carries everything the rest of the program needs to know about it:

- ``name`` (what ``method.name`` selects) and ``summary`` (one line for ``fedpeft methods``);
- ``Options``: a pydantic model of its ``method.options`` (types, bounds, defaults, descriptions;
  unknown keys are refused), subclassing :class:`MethodOptions`;
- capability flags, read by :func:`capabilities`: ``secure_mean`` (the server step is a sample-weighted
  mean of the uploads, so SecAgg+ can run it), ``personalized`` (each client keeps its own adapter),
  ``edits_base_weights`` (the aggregate changes the frozen base weights), ``server_optimizer_refusal``
  (None: server optimizers compose; else the reason they cannot), ``peft_types`` (adapter types it
  supports) and ``peft_type_refusal`` (why it refuses the others), ``dp_mean`` (client-level DP's noise on
  the sum applies: the server step is a mean of the uploads; defaults to ``secure_mean``), ``dp_refusal`` (None, or
  why no client-level DP applies), ``seq2seq_refusal`` (None: it runs on an encoder-decoder such as T5, its
  math being about adapter tensors; else why it depends on a decoder-only structure), ``image_refusal``
  (None: it runs on a vision transformer; else why it needs text), ``flower_refusal``
  (None, or why it cannot run under a Flower deployment);
- ``report_section`` (optional): ``(run_dir, out_dir) -> markdown lines`` added to the run report.

``fedpeft methods``, config validation of ``method.options``, the SecAgg check and the report all read
this registry, so a new method is one new module plus its tests. This module imports no strategy.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError

ReportSection = Callable[[Path, Path], list[str]]
"""(run directory, report directory) -> markdown lines (may write images into the report directory)."""


class MethodOptions(BaseModel):
    """Options every method accepts. The engine fills them from the rest of the config (peft section,
    federation, seed, training.optimizer); a method's own ``Options`` subclasses this."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    r: int | None = Field(None, ge=1, description="LoRA rank (filled from peft.r).")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA alpha (filled from peft.alpha).")
    rslora: bool | None = Field(None, description="rsLoRA scaling alpha/sqrt(r) (filled from peft.rslora).")
    seed: int | None = Field(None, description="Run seed (filled from seed).")
    num_clients: int | None = Field(None, ge=1, description="Registered clients (filled from federation.num_clients).")
    local_optimizer: Literal["adamw", "sgd"] | None = Field(
        None, description="Client optimizer (filled from training.optimizer).")


COMMON_OPTIONS = frozenset(MethodOptions.model_fields)
"""Options every method accepts (filled by the engine); ``fedpeft methods`` lists only the others."""


@dataclass(frozen=True)
class Capabilities:
    secure_mean: bool
    personalized: bool
    edits_base_weights: bool
    server_optimizer_refusal: str | None
    peft_types: tuple[str, ...]
    dp_mean: bool = False
    """Client-level DP with noise on the sum (privacy.mode central / distributed) applies: the server step is
    a mean of the uploads (default: the ``secure_mean`` flag)."""
    dp_refusal: str | None = None
    """Why client-level DP cannot apply to the method at all (None: local DP at least applies)."""
    peft_type_refusal: str = ""
    seq2seq_refusal: str | None = None
    """Why the method cannot run on an encoder-decoder model (model.head=seq2seq); None: it can."""
    image_refusal: str | None = None
    """Why the method cannot run on a vision transformer (model.head=image_classification); None: it can."""
    flower_refusal: str | None = None
    """Why the method cannot run under a Flower deployment (None: it runs there)."""

    @property
    def composes_with_server_optimizers(self) -> bool:
        return self.server_optimizer_refusal is None


STRATEGIES: dict[str, type] = {}
"""Method name -> its strategy class (filled by :func:`register_method`; no aliases, no fallback)."""

_REQUIRED = ("name", "summary", "Options")


def normalize_method_name(name: str) -> str:
    """Case and '-' vs '_' do not matter: 'FFA-LoRA' selects 'ffa_lora'."""
    return name.strip().lower().replace("-", "_")


def register_method(cls: type) -> type:
    """Class decorator: add ``cls`` to the registry under ``cls.name``. The class must declare a name,
    a summary and an ``Options`` model (a :class:`MethodOptions` subclass); a name taken by another
    class is an error."""
    for attr in _REQUIRED:
        if not getattr(cls, attr, None):
            raise TypeError(f"method class {cls.__qualname__} must declare '{attr}' to be registered")
    if not (isinstance(cls.Options, type) and issubclass(cls.Options, MethodOptions)):
        raise TypeError(f"{cls.__qualname__}.Options must subclass fedpeft.strategies.registry.MethodOptions")
    name = cls.name
    if name != normalize_method_name(name):
        raise ValueError(f"method name '{name}' must be lower case with '_' (it is what method.name selects)")
    known = STRATEGIES.get(name)
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"method name '{name}' is already registered by {known.__module__}.{known.__qualname__}")
    capabilities(cls)  # the flags must be well formed
    STRATEGIES[name] = cls
    return cls


def unregister_method(name: str) -> None:
    STRATEGIES.pop(name, None)


@contextmanager
def registered(cls: type) -> Iterator[type]:
    """Register ``cls`` for the duration of a ``with`` block (tests define methods of their own)."""
    register_method(cls)
    try:
        yield cls
    finally:
        unregister_method(cls.name)


def capabilities(cls: type) -> Capabilities:
    """The capability flags a method class declares (class attributes, with the base class defaults)."""
    refusal = getattr(cls, "server_optimizer_refusal", None)
    peft_types = tuple(getattr(cls, "peft_types", ("lora",)))
    if refusal is not None and not str(refusal).strip():
        raise ValueError(f"{cls.__qualname__}.server_optimizer_refusal must give a reason (or be None)")
    if not peft_types:
        raise ValueError(f"{cls.__qualname__}.peft_types must name at least one adapter type")
    seq2seq_refusal = getattr(cls, "seq2seq_refusal", None)
    if seq2seq_refusal is not None and not str(seq2seq_refusal).strip():
        raise ValueError(f"{cls.__qualname__}.seq2seq_refusal must give a reason (or be None)")
    image_refusal = getattr(cls, "image_refusal", None)
    if image_refusal is not None and not str(image_refusal).strip():
        raise ValueError(f"{cls.__qualname__}.image_refusal must give a reason (or be None)")
    flower = getattr(cls, "flower_refusal", None)
    if flower is not None and not str(flower).strip():
        raise ValueError(f"{cls.__qualname__}.flower_refusal must give a reason (or be None)")
    return Capabilities(
        secure_mean=bool(getattr(cls, "secure_mean", False)),
        personalized=bool(getattr(cls, "personalized", False)),
        edits_base_weights=bool(getattr(cls, "edits_base_weights", False)),
        server_optimizer_refusal=refusal,
        peft_types=peft_types,
        dp_mean=bool(getattr(cls, "dp_mean", None) if getattr(cls, "dp_mean", None) is not None
                     else getattr(cls, "secure_mean", False)),
        dp_refusal=getattr(cls, "dp_refusal", None),
        peft_type_refusal=str(getattr(cls, "peft_type_refusal", "") or ""),
        seq2seq_refusal=seq2seq_refusal,
        image_refusal=image_refusal,
        flower_refusal=flower,
    )


def method_class(name: str) -> type:
    """The class registered under ``name`` (normalised); an unknown name lists the valid ones and the
    nearest one."""
    key = normalize_method_name(name)
    if key not in STRATEGIES:
        guess = difflib.get_close_matches(key, sorted(STRATEGIES), n=1, cutoff=0.6)
        hint = f"; did you mean '{guess[0]}'?" if guess else ""
        raise ValueError(f"unknown method '{name}'{hint} (valid methods: {', '.join(sorted(STRATEGIES))})")
    return STRATEGIES[key]


def secure_methods() -> list[str]:
    """Names of the methods SecAgg+ can run (their server step needs only the weighted mean)."""
    return sorted(name for name, cls in STRATEGIES.items() if capabilities(cls).secure_mean)


# --- options ----------------------------------------------------------------------------------------
class MethodOptionsError(ValueError):
    """``method.options`` that the method's model refuses; ``lines`` name each field, value and expectation."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("; ".join(lines))
        self.lines = lines


def option_error_lines(err: ValidationError, model: type[BaseModel], method: str) -> list[str]:
    """One line per problem: ``method.options.<key>`` with the value and what was expected; an unknown
    key gets the nearest valid key and the list of valid ones."""
    valid = sorted(model.model_fields)
    lines = []
    for item in err.errors():
        loc = [str(p) for p in item["loc"]]
        key = "method.options." + ".".join(loc) if loc else "method.options"
        if item["type"] == "extra_forbidden":
            guess = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
            hint = f"; did you mean 'method.options.{guess[0]}'?" if guess else ""
            lines.append(f"{key} is not an option of method '{method}'{hint} (valid options: {', '.join(valid)})")
        else:
            msg = item["msg"].removeprefix("Value error, ")
            lines.append(f"{key}: {msg} (got {item.get('input')!r}) [method '{method}']")
    return lines


def parse_options(cls: type, options: Mapping[str, Any] | BaseModel | None) -> BaseModel:
    """``options`` validated by ``cls.Options`` (a model instance passes through when it is one)."""
    model = cls.Options
    if isinstance(options, model):
        return options
    if isinstance(options, BaseModel):
        options = options.model_dump(exclude_unset=True)
    try:
        return model.model_validate(dict(options or {}))
    except ValidationError as err:
        raise MethodOptionsError(option_error_lines(err, model, cls.name)) from None


def type_text(annotation: Any) -> str:
    """A short readable type: ``'a' | 'b'`` for literals, ``int | list[int] | None`` for unions."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return type_text(args[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, UnionType):
        return " | ".join(type_text(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_text(a) for a in args)}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def option_rows(model: type[BaseModel]) -> list[dict[str, Any]]:
    """The method's own options (not the common ones): name, type, default, bounds and description."""
    rows = []
    for key, field in model.model_fields.items():
        if key in COMMON_OPTIONS:
            continue
        bounds = [f"{k} {getattr(m, k)}" for m in field.metadata for k in ("ge", "gt", "le", "lt")
                  if getattr(m, k, None) is not None]
        symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
        bounds = [f"{symbols[b.split()[0]]} {b.split()[1]}" for b in bounds]
        rows.append({
            "name": key,
            "type": type_text(field.annotation),
            "default": None if field.is_required() else field.get_default(call_default_factory=True),
            "bounds": ", ".join(bounds),
            "description": field.description or "",
        })
    return rows
