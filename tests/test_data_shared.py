"""Opt-in: load every dataset in the shared data folder through the built-in names and print row
counts (``pytest -m shared_data -s``). Skipped when FEDPEFT_DATA_DIR / ../shared/data is absent."""

from __future__ import annotations

import pytest

from fedpeft.data.builtin import BUILTINS, data_dir, load_builtin, make_task

pytestmark = pytest.mark.shared_data

ROOT = data_dir()
if ROOT is None or not ROOT.is_dir():
    pytest.skip("no shared data (set FEDPEFT_DATA_DIR or provide ../shared/data)", allow_module_level=True)

# Expected counts from the data README / SOURCE_MANIFEST.
EXPECTED = {
    ("gsm8k", "train"): 7473, ("gsm8k", "test"): 1319,
    ("sst2", "train"): 60614, ("sst2", "validation"): 6735, ("sst2", "test"): 872,
    ("mmlu", "dev"): 285, ("boolq", "train"): 9427, ("boolq", "test"): 3270, ("piqa", "test"): 1838,
    ("social_i_qa", "test"): 1954, ("ARC-Challenge", "test"): 1172, ("ARC-Easy", "test"): 2376,
    ("openbookqa", "test"): 500, ("winogrande", "test"): 1267, ("AQuA", "test"): 254, ("SVAMP", "test"): 1000,
    ("mt_bench", "test"): 80, ("alpaca_gpt4_demo", "train"): 999, ("dolly", "test"): 80,
}


def _local_pairs():
    for name, spec in BUILTINS.items():
        if spec.members:
            continue
        for split, relative in spec.local.items():
            if (ROOT / relative).exists():
                yield name, split


@pytest.mark.parametrize("name, split", sorted(_local_pairs()))
def test_every_local_dataset_loads_and_validates(name, split):
    records = load_builtin(name, split, hub=False)
    print(f"{name:18s} {split:10s} {len(records):6d} rows")
    if (name, split) in EXPECTED:
        assert len(records) == EXPECTED[(name, split)]
    spec = BUILTINS[name]
    if spec.task is not None:
        task = make_task(name)
        task.validate(records, f"{name}/{split}")
        if spec.task != "instruction":  # exact-answer tasks score their own target as right
            assert all(task.score(task.target(r), r) == 1.0 for r in records[:500])


def test_dolly_splits_by_file_and_category():
    rows = load_builtin("dolly", "train", ROOT / "dolly" / "8")
    assert len({r["client"] for r in rows}) == 8 and len({r["category"] for r in rows}) == 8


def test_groups_available_offline():
    for group in ("commonsense_eval", "math_eval"):
        rows = load_builtin(group, "test", hub=False, skip_missing=True)
        print(group, len(rows), "rows,", len({r["task"] for r in rows}), "tasks")
        assert len({r["task"] for r in rows}) >= 7
