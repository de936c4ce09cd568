"""Flower test fakes: a Grid that answers in process with the real ClientApp (mods included), and the
environment every Flower test needs (offline settings, a private FLWR_HOME, a task identity)."""

from __future__ import annotations

import copy

import pytest
from flwr.app import Context, Error, Message, RecordDict

from fedpeft.deploy.flower import client_app


class FakeGrid:
    """The part of Flower's Grid that FlowerTransport (and SecAgg+'s workflow) uses. Each message is
    delivered as a copy (as if serialised: a workflow may send one content object to several nodes) to
    the real ClientApp with that node's persistent Context, as a SuperNode keeps it between messages.
    ``tamper(message, reply)`` may change or drop (return None) a reply; ``seen`` keeps (message, reply)."""

    def __init__(self, run_config, node_configs, tamper=None):
        self.run_config = run_config
        self.nodes = {100 + i: cfg for i, cfg in enumerate(node_configs)}
        self.contexts = {n: Context(run_id=1, node_id=n, node_config=c, state=RecordDict(), run_config=run_config)
                         for n, c in self.nodes.items()}
        self.tamper = tamper
        self.replies: dict[str, Message] = {}
        self.seen: list[tuple[Message, Message]] = []
        self.count = 0

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            self.count += 1
            msg.metadata.__dict__["_message_id"] = f"m{self.count}"
            try:
                reply = client_app.app(copy.deepcopy(msg), self.contexts[msg.metadata.dst_node_id])
            except Exception as exc:  # what flwr-clientapp turns an exception into
                reply = Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            if self.tamper is not None:
                reply = self.tamper(msg, reply)
            if reply is not None:
                self.replies[msg.metadata.message_id] = reply
                self.seen.append((msg, reply))
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


@pytest.fixture(autouse=True)
def flower_env(tmp_path, monkeypatch):
    """Offline Flower settings, a private FLWR_HOME, and the process's Flower task identity (messages
    are stamped with it; flwr-serverapp sets it when deployed). Import it into a test module to use it."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedpeft.deploy.flower.local import OFFLINE_ENV

    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
