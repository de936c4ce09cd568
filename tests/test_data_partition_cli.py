"""``fedpeft partition``: table + CSV, the seed-001 table from sizes alone, errors, and no model loaded."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import typer
from typer.testing import CliRunner

from fedpeft.commands import partition as partition_command

GLUE = "sst2=67349,mrpc=3668,qqp=363846,qnli=104743,rte=2490"


def _app() -> typer.Typer:
    app = typer.Typer()
    partition_command.register(app)

    @app.callback()
    def _main() -> None:  # keep "partition" as a sub-command
        pass

    return app


def _invoke(*args: str):
    return CliRunner().invoke(_app(), ["partition", *args], catch_exceptions=False)


def test_sizes_reproduce_the_seed_001_glue_table(tmp_path):
    out = tmp_path / "glue.csv"
    result = _invoke("--sizes", GLUE, "--plain", "--out", str(out), "seed=42", "data.partition.kind=task_dirichlet",
                     "data.partition.min_frac=0.01", "data.partition.alpha=0.5", "federation.num_clients=10")
    assert result.exit_code == 0, result.output
    assert "#6          5443      71  165334   43650       0   214498" in result.output
    rows = out.read_text().splitlines()
    assert rows[0] == "client,sst2,mrpc,qqp,qnli,rte,total"
    assert rows[1] == "0,9765,0,0,4435,1029,15229"
    assert rows[-1] == "total,67349,3668,363846,104743,2490,542096"


def test_config_with_a_local_file_and_zero_client_warning(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"q{i}", "output": "a", "topic": f"t{i % 2}"}) for i in range(40)))
    config = tmp_path / "c.yaml"
    config.write_text(textwrap.dedent(f"""
        name: demo
        seed: 1
        data: {{source: "{data}", eval_examples_per_task: 4, partition: {{kind: dirichlet, by: topic, alpha: 0.05, min_frac: 0.2}}}}
        federation: {{num_clients: 8, clients_per_round: 2}}
        output: {{dir: "{tmp_path / 'runs'}"}}
    """))
    result = _invoke("--config", str(config))
    assert result.exit_code == 0, result.output
    assert "t0" in result.output and "t1" in result.output and "36" in result.output
    assert "received no records" in result.output
    csv_path = tmp_path / "runs" / "demo-partition.csv"
    assert csv_path.exists() and csv_path.read_text().splitlines()[-1].endswith(",36")


def test_bad_input_exits_2_with_a_message(tmp_path):
    result = _invoke("data.source=" + str(tmp_path / "missing.json"), "--out", str(tmp_path / "x.csv"))
    assert result.exit_code == 2 and "missing.json" in result.output
    result = _invoke("--sizes", "a=3,b=1", "federation.num_clients=5", "--out", str(tmp_path / "x.csv"))
    assert result.exit_code == 2 and "more clients (5) than records (4)" in result.output


def test_partition_command_loads_no_model(tmp_path):
    code = textwrap.dedent(f"""
        import sys, typer
        from typer.testing import CliRunner
        from fedpeft.commands import partition
        app = typer.Typer()
        partition.register(app)
        app.callback()(lambda: None)
        result = CliRunner().invoke(app, ["partition", "--sizes", "a=50,b=30", "--out", {str(tmp_path / 'p.csv')!r}])
        assert result.exit_code == 0, result.output
        heavy = [m for m in ("torch", "transformers", "peft", "fedpeft.models.registry") if m in sys.modules]
        print("HEAVY", heavy)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout
