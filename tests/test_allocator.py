"""glibc malloc tuning: opt-out and user settings are respected; never raises."""

from __future__ import annotations

import fedpeft.metering.allocator as allocator


def test_opt_out(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setenv("FEDPEFT_MALLOC", "default")
    assert allocator.tune_malloc() is False
    assert allocator.malloc_mode() == "glibc default"


def test_user_env_is_left_alone(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.delenv("FEDPEFT_MALLOC", raising=False)
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "100000000000")
    assert allocator.tune_malloc() is True
    assert allocator.malloc_mode().startswith("env ")


def test_applies_on_glibc(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", None)
    for var in ("FEDPEFT_MALLOC", *allocator.ENV_VARS):
        monkeypatch.delenv(var, raising=False)
    applied = allocator.tune_malloc()
    assert applied is (allocator._libc() is not None)
    assert allocator.tune_malloc() is applied  # idempotent
