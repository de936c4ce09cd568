"""Evaluation on the server: the global adapter, per-task adapters (FL-TAC), per-client adapters
(FedSA-LoRA, local-only) and the benchmark suites, each logged as an ``eval`` event (docs/metrics.md).

The round loop calls :meth:`Evaluator.evaluate` every ``evaluation.every_rounds`` rounds and
:meth:`Evaluator.finish` once at the end. Per-client evaluation needs each client's private state,
which lives in the client store of the process that trained it: in process that is the engine's own
store; under Flower it is on the nodes, so the nodes score their clients' personal adapters (an
"evaluate" message, Flower's configure/aggregate-evaluate vocabulary; ``personal_scores`` is the code
they run) and the server aggregates the returned scores. A transport that cannot do that makes the
server log why instead (``eval`` event with ``split="personal"`` and ``skipped``), never a score of
state it does not have.
"""

from __future__ import annotations

import time
import numpy as np

from fedpeft.adapters import AdapterState, set_adapter_state
from fedpeft.alignment.experiment import objective_from_config, preference_eval
from fedpeft.evaluation.classification import classification_eval, image_classification_eval
from fedpeft.evaluation.generation import generation_eval
from fedpeft.evaluation.suites import EvalOptions, flat_metrics, run_suite
from fedpeft.seeding import derive_seed

FINETUNE_OFF_SERVER = ("local fine-tuning after federation needs the clients' data, which this transport keeps "
                       "where they train")

PERSONAL_OFF_SERVER = ("the clients' private state (personal adapters) lives where they train, not on the "
                       "server, and this transport cannot evaluate there")


class Evaluator:
    def __init__(self, model, tokenizer, config, data, strategy, store, metrics, client_indices: list[list[int]],
                 labels: list[str], personal_on_server: bool = True,
                 remote_personal: Callable[[int, AdapterState, list[int]], dict[int, float] | None] | None = None,
                 finetune: Callable[[int, AdapterState], AdapterState] | None = None) -> None:
        self.model, self.tokenizer, self.config, self.data = model, tokenizer, config, data
        self.strategy, self.store, self.metrics = strategy, store, metrics
        self.client_indices, self.labels = client_indices, labels
        self.personal_on_server = personal_on_server
        self.remote_personal = remote_personal
        """Where the clients' state is elsewhere: ``(round, global, clients) -> client -> score`` (None:
        that transport cannot evaluate there)."""
        self.finetune = finetune
        """``(client, adapter) -> that adapter fine-tuned on the client's data`` (evaluation.finetune_steps)."""
        self.headline_metric: str | None = None
        self.objective = objective_from_config(config)
        """A preference objective's loss (training.objective): held-out pairs are scored with it."""
        # The partition label (data.partition.by, else the task) of every evaluation record.
        self.eval_labels = [str(r.get(data.label_field, r.get("task"))) for r in data.evaluation]

    def _score(self, records: list[dict], final: bool) -> dict:
        """Score ``records`` with the adapter now loaded: generation and the data's own scorer, or the
        classification head's accuracy. ``evaluation.max_examples`` already made the data's evaluation
        records one seeded sample (``data.dataset.sample_evaluation``), so the cap below changes nothing
        for them and every evaluation, the final one included, scores the same records."""
        ecfg = self.config.evaluation
        cap = None if final else ecfg.max_examples
        if self.objective is not None:  # reward / DPO / IPO: pairwise accuracy and margin on held-out pairs
            return preference_eval(self.model, self.tokenizer, self.objective, records, self.config, max_examples=cap)
        if self.config.model.head == "image_classification":  # self.tokenizer is the image processor
            return image_classification_eval(self.model, self.tokenizer, records, self.data.classes(),
                                             batch_size=ecfg.batch_size, max_examples=cap, group_by=ecfg.group_by,
                                             allowed=self.data.task_classes())
        if self.config.model.head == "classification":
            return classification_eval(self.model, self.tokenizer, records, self.data.classes(),
                                       max_len=self.config.training.max_seq_len, batch_size=ecfg.batch_size,
                                       max_examples=cap, group_by=ecfg.group_by)
        return generation_eval(self.model, self.tokenizer, records, self.config.data.template,
                               score=self.data.score, metric_name=self.data.metric_name,
                               max_new_tokens=ecfg.max_new_tokens, batch_size=ecfg.batch_size,
                               max_examples=cap, group_by=ecfg.group_by)

    def evaluate(self, global_state: AdapterState, round_idx: int, final: bool = False) -> dict[str, float]:
        """The global model (the strategy's ``evaluation_state``) and, for multi-adapter methods, each
        task's own adapter."""
        set_adapter_state(self.model, self.strategy.evaluation_state(global_state, self.store))
        result = self._score(self.data.evaluation, final)
        self.headline_metric = result["headline"]
        self.metrics.log("eval", round=round_idx, metrics=result["metrics"], examples=result["examples"],
                         seconds=result["seconds"], samples=result["samples"])
        metrics = dict(result["metrics"])
        for view, enter in self.strategy.evaluation_views().items():  # FedOT: also through the emulator
            with enter():
                seen = self._score(self.data.evaluation, final)
            self.metrics.log("eval", round=round_idx, split=view, metrics=seen["metrics"], examples=seen["examples"],
                             seconds=seen["seconds"])
            metrics.update({f"{view}/{k}": v for k, v in seen["metrics"].items()})
        per_task = self.strategy.task_evaluation_states(global_state, self.store)
        if per_task:
            metrics.update(self.task_adapters(per_task, global_state, round_idx, final))
        return metrics

    def finish(self, global_state: AdapterState, round_idx: int) -> dict[str, float]:
        """End of run: personal adapters (personalised methods) and the configured suites."""
        metrics: dict[str, float] = {}
        if self.strategy.personalized:
            metrics.update(self.personal(global_state, round_idx))
        if self.config.evaluation.finetune_steps:
            metrics.update(self.finetuned(global_state, round_idx))
        if self.config.evaluation.suites:
            metrics.update(self.suites(global_state, round_idx))
        return metrics

    def task_adapters(self, per_task: dict[str, AdapterState], global_state: AdapterState, round_idx: int,
                      final: bool) -> dict[str, float]:
        """Multi-adapter methods (FL-TAC): each label's evaluation records scored with its own adapter."""
        start = time.perf_counter()
        groups: dict[str, list[dict]] = {}
        for record, label in zip(self.data.evaluation, self.eval_labels):
            groups.setdefault(label, []).append(record)
        fallback = self.strategy.evaluation_state(global_state, self.store)
        metrics: dict[str, float] = {}
        weighted, total, headline = 0.0, 0, None
        for label, records in sorted(groups.items()):
            set_adapter_state(self.model, per_task.get(label, fallback))
            result = self._score(records, final)
            headline = result["headline"]
            metrics[f"task_adapters/{label}/{headline}"] = result["metrics"][headline]
            weighted += result["metrics"][headline] * result["examples"]
            total += result["examples"]
        if headline is not None and total:
            metrics[f"task_adapters/{headline}"] = weighted / total
        self.metrics.log("eval", round=round_idx, split="task_adapters", metrics=metrics, examples=total,
                         seconds=time.perf_counter() - start)
        return metrics

    def personal_clients(self) -> list[int]:
        """The clients scored with their own adapter: all, or with ``evaluation.personal_max_clients`` a
        seeded sample of that many (one generation pass per client is the cost: about 34 s for 1,000
        tiny clients)."""
        clients = list(range(len(self.client_indices)))
        cap = self.config.evaluation.personal_max_clients
        if cap is not None and cap < len(clients):
            rng = np.random.default_rng(derive_seed(self.config.seed, "personal_eval"))
            clients = sorted(int(c) for c in rng.choice(len(clients), size=cap, replace=False))
        return clients

    def client_records(self, client_id: int) -> list[dict]:
        """The evaluation records of the labels client ``client_id`` holds (its own distribution)."""
        held = {self.labels[i] for i in self.client_indices[client_id]}
        return [r for r, label in zip(self.data.evaluation, self.eval_labels) if label in held]

    def personal_scores(self, global_state: AdapterState, clients: list[int]) -> dict[int, float]:
        """Each client's own adapter (``strategy.personal_state`` from this process's client store) on
        the evaluation records of the labels it holds: client -> headline score. Runs wherever the
        clients' private state lives (the engine's process, or a Flower node for the clients it serves)."""
        scores = {}
        for client_id in clients:
            state = self.strategy.personal_state(client_id, global_state, self.store)
            records = self.client_records(client_id)
            if state is None or not records:
                continue
            set_adapter_state(self.model, state)
            result = self._score(records, final=False)
            scores[client_id] = result["metrics"][result["headline"]]
            self.headline_metric = self.headline_metric or result["headline"]
        return scores

    def personal(self, global_state: AdapterState, round_idx: int) -> dict[str, float]:
        """Personalised methods (FedSA-LoRA, local-only): the mean and spread over clients of each
        client's score with its own adapter, scored here or (``remote``) where the client state lives."""
        start = time.perf_counter()
        clients = self.personal_clients()
        where = "server"
        if self.personal_on_server:
            per_client = self.personal_scores(global_state, clients)
        else:
            per_client = self.remote_personal(round_idx, global_state, clients) if self.remote_personal else None
            where = "nodes"
            if per_client is None:
                self.metrics.log("eval", round=round_idx, split="personal", metrics={}, skipped=PERSONAL_OFF_SERVER)
                return {}
        if not per_client:
            return {}
        metrics = spread("personal", per_client)
        self.metrics.log("eval", round=round_idx, split="personal", metrics=metrics,
                         per_client={str(k): v for k, v in sorted(per_client.items())}, examples=len(per_client),
                         clients_sampled=len(clients), clients_total=len(self.client_indices), scored_on=where,
                         headline=self.headline_metric,
                         seconds=time.perf_counter() - start)
        return metrics

    def finetuned(self, global_state: AdapterState, round_idx: int) -> dict[str, float]:
        """Local fine-tuning after federation: each evaluated client fine-tunes the final global adapter
        (``evaluation_state``) on its own data, then scores it on the evaluation records of its labels;
        the mean and spread over clients, as ``finetuned/*``."""
        start = time.perf_counter()
        if not self.personal_on_server or self.finetune is None:
            self.metrics.log("eval", round=round_idx, split="finetuned", metrics={}, skipped=FINETUNE_OFF_SERVER)
            return {}
        clients = self.personal_clients()
        start_state = self.strategy.evaluation_state(global_state, self.store)
        per_client: dict[int, float] = {}
        for client_id in clients:
            records = self.client_records(client_id)
            if not records or not self.client_indices[client_id]:
                continue
            set_adapter_state(self.model, self.finetune(client_id, start_state))
            result = self._score(records, final=False)
            per_client[client_id] = result["metrics"][result["headline"]]
            self.headline_metric = self.headline_metric or result["headline"]
        if not per_client:
            return {}
        metrics = spread("finetuned", per_client)
        self.metrics.log("eval", round=round_idx, split="finetuned", metrics=metrics,
                         per_client={str(k): v for k, v in sorted(per_client.items())}, examples=len(per_client),
                         clients_sampled=len(clients), clients_total=len(self.client_indices),
                         steps=self.config.evaluation.finetune_steps, headline=self.headline_metric,
                         seconds=time.perf_counter() - start)
        return metrics

    def suites(self, global_state: AdapterState, round_idx: int) -> dict[str, float]:
        """The configured benchmark suites on the final global model (``fedpeft eval`` uses the same code)."""
        ecfg = self.config.evaluation
        set_adapter_state(self.model, self.strategy.evaluation_state(global_state, self.store))
        start = time.perf_counter()
        metrics: dict[str, float] = {}
        for suite in ecfg.suites:
            options = EvalOptions(limit=ecfg.suite_limit, template=self.config.data.template,
                                  batch_size=ecfg.batch_size, seed=self.config.seed)
            scores = flat_metrics(run_suite(self.model, self.tokenizer, suite, options))
            metrics.update({f"suite/{k}": v for k, v in scores.items()})
        self.metrics.log("eval", round=round_idx, split="suites", suites=list(ecfg.suites), metrics=metrics,
                         seconds=time.perf_counter() - start)
        return metrics


def spread(prefix: str, per_client: dict[int, float]) -> dict[str, float]:
    """Mean, (population) standard deviation, min and max over clients of their scores."""
    values = np.array(list(per_client.values()), dtype=float)
    return {f"{prefix}/mean": float(values.mean()), f"{prefix}/std": float(values.std()),
            f"{prefix}/min": float(values.min()), f"{prefix}/max": float(values.max())}
