"""docs/data.md's worked example, run as written (on the tiny random encoder instead of MiniLM)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "data.md"


def _section(title: str) -> str:
    text = DOC.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


def test_the_documented_config_and_data_are_the_files():
    section = _section("A worked example")
    [config] = _blocks(section, "yaml")
    assert config == (REPO / "examples" / "news" / "news.yaml").read_text()
    data_rows, preview = _blocks(section, "text")
    assert data_rows.splitlines() == (REPO / "examples" / "news" / "news.tsv").read_text().splitlines()[:3]


def test_the_worked_example_runs_as_written(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from fedpeft.cli import app

    monkeypatch.chdir(REPO)
    section = _section("A worked example")
    [commands] = [b for b in _blocks(section, "bash") if "fedpeft run" in b]
    lines = [line for line in commands.splitlines() if line.startswith("fedpeft ")]
    assert [line.split()[1] for line in lines] == ["data", "partition", "run"]
    runner = CliRunner()
    outputs = {}
    for line in lines:
        # As written, on the tiny encoder, writing under tmp_path.
        args = shlex.split(line)[1:] + ["model.name=tiny-bert", f"output.dir={tmp_path}", "output.run_name=news"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, f"{line}\n{result.output}"
        outputs[args[0]] = result.output
    # The doc's `fedpeft data` excerpt is what the command prints.
    _, preview = _blocks(section, "text")
    printed = outputs["data"].splitlines()
    for documented in preview.splitlines():
        if documented.startswith("first "):
            break
        assert documented in printed
    assert "labels of task 'news' (4, inferred from the training records)" in outputs["partition"]
    events = [json.loads(line) for line in (tmp_path / "news" / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["event"] == "eval"]
    # Evaluated every 2 rounds, always on the 40 records of news_test.tsv.
    assert [e["round"] for e in evals] == [0, 2, 4, 6] and {e["examples"] for e in evals} == {40}
    assert set(evals[-1]["metrics"]) == {"accuracy", "news/accuracy"}
    test_texts = [line.split("\t", 1)[1] for line in (REPO / "examples/news/news_test.tsv").read_text().splitlines()]
    samples = evals[-1]["samples"]
    assert samples and all(s["input"] in test_texts and s["expected"] in {"business", "sci/tech", "sports", "world"}
                           and s["predicted"] in {"business", "sci/tech", "sports", "world"} for s in samples)
    start = next(e for e in events if e["event"] == "run_start")
    assert start["data"]["label_sets"]["news"] == {"Business": "business", "Sci/Tech": "sci/tech",
                                                    "Sports": "sports", "World": "world"}


@pytest.mark.parametrize("line", [l for l in _section("A worked example").split("\n") if "model.head=causal_lm" in l][:1])
def test_the_generating_variant_loads(line, monkeypatch):
    from fedpeft.config import load_config
    from fedpeft.data.dataset import load_experiment_data

    monkeypatch.chdir(REPO)
    overrides = re.findall(r"(\w+\.\w+=\S+?)(?=`|\s|$)", line)
    cfg = load_config("examples/news/news.yaml", overrides)
    assert cfg.model.head == "causal_lm"
    record = load_experiment_data(cfg).train[0]
    assert record["instruction"] == "Classify the text. Answer with one word: business or sci/tech or sports or world."
    assert record["output"] == "business"
