"""Federated methods behind one seam (see ``base.py``), selected by name in the config.

Every module of this package is imported here, and each method registers itself where it is defined
(``registry.register_method``): there is no list of methods to edit. ``STRATEGIES`` is the registry.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import pkgutil
from typing import Any

from fedpeft.config import IMAGE_HEAD, METHOD_CHECKS
from fedpeft.evaluation.suite_table import LM_EVAL_PREFIX, TASKS, resolve_suite
from fedpeft.models.registry import ModelNotFoundError, model_head
from fedpeft.privacy.compat import privacy_problems

from fedpeft.strategies.base import AggregateResult, ClientPlan, ClientUpdate, ServerContext, Strategy, TrainResult
from fedpeft.strategies.registry import (
    COMMON_OPTIONS,
    STRATEGIES,
    MethodOptionsError,
    capabilities,
    method_class,
    normalize_method_name,
    option_rows,
    parse_options,
)
from fedpeft.strategies.server_optimizers import SERVER_OPTIMIZERS, build_server_optimizer, rule_defaults

log = logging.getLogger(__name__)

for _module in pkgutil.iter_modules(__path__):  # each method module registers its class on import
    importlib.import_module(f"{__name__}.{_module.name}")


def method_catalog() -> list[dict[str, Any]]:
    """One entry per registered method, for ``fedpeft methods``: name, summary, its own options (with
    defaults, bounds and descriptions) and its capability flags."""
    out = []
    for name, cls in sorted(STRATEGIES.items()):
        caps = capabilities(cls)
        out.append({
            "name": name,
            "summary": cls.summary,
            "options": [row["name"] for row in option_rows(cls.Options)],
            "option_rows": option_rows(cls.Options),
            "server_optimizer": caps.server_optimizer_refusal or "composes",
            "personalized": caps.personalized,
            "secure_mean": caps.secure_mean,
            "dp_modes": [] if caps.dp_refusal else (["central", "distributed", "local"] if caps.dp_mean else ["local"]),
            "dp_refusal": caps.dp_refusal,
            "edits_base_weights": caps.edits_base_weights,
            "peft_types": list(caps.peft_types),
            "seq2seq": caps.seq2seq_refusal or "runs",
            "image": caps.image_refusal or "runs",
            "report_section": getattr(cls, "report_section", None) is not None,
            "flower_refusal": caps.flower_refusal,
        })
    return out


def check_method_config(method: Any, peft_type: str | None = None) -> None:
    """A ``MethodConfig`` against the registry: a registered name, options the method's model accepts, a
    server optimizer rule with only its own hyperparameters, and (given) a supported ``peft.type``.
    Raises :class:`MethodOptionsError` with one line per problem (field, value, expectation)."""
    try:
        cls = method_class(method.name)
    except ValueError as exc:
        raise MethodOptionsError([f"method.name: {exc}"]) from None
    lines = []
    try:
        parse_options(cls, method.options)
    except MethodOptionsError as exc:
        lines += exc.lines
    rule = method.server_optimizer
    if rule.name not in SERVER_OPTIMIZERS:
        guess = difflib.get_close_matches(rule.name, list(SERVER_OPTIMIZERS), n=1, cutoff=0.6)
        hint = f"; did you mean '{guess[0]}'?" if guess else ""
        lines.append(f"method.server_optimizer.name: unknown server optimizer '{rule.name}'{hint} "
                     f"(expected one of {', '.join(SERVER_OPTIMIZERS)})")
    elif rule.name != "none" and capabilities(cls).server_optimizer_refusal:
            lines.append(f"method.server_optimizer.name: method '{cls.name}' cannot be combined with server optimizer "
                         f"'{rule.name}': {capabilities(cls).server_optimizer_refusal}")
    supported = capabilities(cls).peft_types
    if peft_type is not None and peft_type not in supported:
        reason = capabilities(cls).peft_type_refusal
        lines.append(f"peft.type: method '{cls.name}' supports {', '.join(supported)}, not '{peft_type}'"
                     + (f": {reason}" if reason else ""))
    if lines:
        raise MethodOptionsError(lines)


def unused_hyperparameters(rule: Any) -> list[str]:
    """The hyperparameters a ``ServerOptimizerConfig`` sets that its rule does not have (FedAvgM's tau,
    anything for ``none``). Configs saved before the per-rule defaults hold all four, so these are
    ignored with a warning rather than refused."""
    if rule.name not in SERVER_OPTIMIZERS:
        return []
    have = rule_defaults(rule.name)
    return [k for k in ("lr", "beta1", "beta2", "tau") if getattr(rule, k, None) is not None and k not in have]


def check_experiment_method(config: Any) -> None:
    """The method section of an ``ExperimentConfig`` (see :func:`check_method_config`); hyperparameters
    its server-optimizer rule lacks are dropped with a warning (configs saved before the per-rule
    defaults set all four). Added to ``config.METHOD_CHECKS`` when this package is imported."""
    cls = STRATEGIES.get(normalize_method_name(config.method.name))  # unknown: check_method_config names it
    reason = capabilities(cls).image_refusal if cls is not None else None
    if config.model.head == IMAGE_HEAD and reason:  # before its options: they do not matter then
        raise MethodOptionsError([f"method.name={config.method.name} is refused with model.head={IMAGE_HEAD}: {reason}"])
    check_method_config(config.method, peft_type=config.peft.type)
    try:  # the family known without downloads (tiny-t5, a local T5, a cached hub config); the engine re-checks
        head = model_head(config.model, fetch=False)
    except ModelNotFoundError:  # a missing local path: model preflight reports it when a run starts
        head = config.model.head
    except ValueError as exc:  # a head the model cannot have (models/family.py), naming model.head
        raise MethodOptionsError([str(exc)]) from None
    check_model_family(config, head)
    cls = method_class(config.method.name)
    problems = getattr(cls, "config_problems", None)  # a method's own cross-section refusals (FedOT full)
    if problems is not None:
        lines = problems(config, parse_options(cls, config.method.options))
        if lines:
            raise MethodOptionsError(lines)
    privacy = getattr(config, "privacy", None)
    if privacy is not None:
        cls = method_class(config.method.name)
        lines = privacy_problems(privacy, cls.name, capabilities(cls), config.federation.robust.rule)
        if lines:
            raise MethodOptionsError(lines)
    rule = config.method.server_optimizer
    for key in unused_hyperparameters(rule):
        log.warning("method.server_optimizer.%s=%s: the rule '%s' has no %s; ignored", key, getattr(rule, key),
                    rule.name, key)
        setattr(rule, key, None)


def model_family_problems(config: Any, head: str) -> list[str]:
    """What a config asks of an encoder-decoder (``head`` = seq2seq) that it cannot do: a method with a
    ``seq2seq_refusal``, a preference objective, DP-SGD. One line per problem, naming the field."""
    if head != "seq2seq":
        return []
    lines = []
    what = f"an encoder-decoder model (model.name '{config.model.name}', model.head=seq2seq)"
    refusal = capabilities(method_class(config.method.name)).seq2seq_refusal
    if refusal:
        lines.append(f"method.name: method '{config.method.name}' does not run on {what}: {refusal}")
    objective = getattr(config.training, "objective", "sft")
    if objective != "sft":
        lines.append(f"training.objective: '{objective}' is built for a causal LM or a classification head, not for "
                     f"{what}; use training.objective=sft")
    privacy = getattr(config, "privacy", None)
    if privacy is not None and privacy.dp_sgd.enabled:
        lines.append(f"privacy.dp_sgd.enabled: DP-SGD's per-example losses assume a causal LM's label shift; not "
                     f"built for {what}")
    entries = [entry for suite in getattr(config.evaluation, "suites", []) for entry in resolve_suite(suite)]
    by_loglik = sorted({e.task for e in entries if e.task.startswith(LM_EVAL_PREFIX) or "loglik" in TASKS[e.task].auto})
    if by_loglik:
        lines.append(f"evaluation.suites: {', '.join(by_loglik)} score by log-likelihood (a causal LM's continuation "
                     f"logits), not built for {what}; generation suites (gsm8k, ...) run")
    return lines


def check_model_family(config: Any, head: str | None = None) -> None:
    """Raise :class:`MethodOptionsError` for :func:`model_family_problems`. ``head`` None: the model's own
    (its config.json read, downloaded alone when need be); the engine calls this before the weights load."""
    if head is None:
        head = model_head(config.model)
    lines = model_family_problems(config, head)
    if lines:
        raise MethodOptionsError(lines)


def build_experiment_strategy(config: Any) -> Strategy:
    """The strategy of an ``ExperimentConfig``: ``method.options`` completed with what every method may
    need from the rest of the config (LoRA rank/alpha/rsLoRA, number of clients, seed). The engine and
    the Flower ClientApp both build it here, so the two sides of a deployment agree."""
    options = dict(config.method.options)
    options.setdefault("r", config.peft.r)
    options.setdefault("lora_alpha", config.peft.alpha)
    options.setdefault("rslora", config.peft.rslora)
    options.setdefault("num_clients", config.federation.num_clients)
    options.setdefault("seed", config.seed)
    options.setdefault("local_optimizer", config.training.optimizer)
    return build_strategy(config.method.model_copy(update={"options": options}))


def build_strategy(method_config: Any) -> Strategy:
    """From a ``MethodConfig``. An unknown name is an error listing the valid names (no silent fallback);
    a server optimizer a method cannot use is an error giving the reason."""
    cls = method_class(method_config.name)
    return cls(options=method_config.options, server_optimizer=build_server_optimizer(method_config.server_optimizer))


__all__ = [
    "COMMON_OPTIONS", "AggregateResult", "ClientPlan", "ClientUpdate", "SERVER_OPTIMIZERS", "STRATEGIES",
    "ServerContext", "Strategy", "TrainResult", "build_experiment_strategy", "build_strategy", "capabilities",
    "check_method_config", "check_model_family", "unused_hyperparameters",
    "method_catalog", "method_class", "normalize_method_name",
]

if check_experiment_method not in METHOD_CHECKS:  # the config checks method sections against this registry
    METHOD_CHECKS.append(check_experiment_method)
