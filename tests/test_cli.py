"""The command line's one behaviour: every command through one error handler (a bad config or a
failed training is one line naming it and a non-zero exit, the traceback in the command's log),
``--set`` overrides checked by key and type, options that work, and a quiet console (Ray's own
output in the log file, not on the terminal)."""

import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from oclear_ray import cli
from oclear_ray.cli import app
from tests.local_ray import BIN, REPO
from tests.tiny import TINY_MODEL

TRAIN = ["train", "--catalog", "catalog.parquet", "--workdir"]
PIPELINE = ["pipeline", "--catalog", "catalog.parquet", "--workdir"]


def run(args: list[str]):
    return CliRunner().invoke(app, args)


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


@pytest.mark.parametrize("command", [TRAIN, PIPELINE], ids=["train", "pipeline"])
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--set", "optim.lrr=1e-3"], "error: --set optim.lrr: no key 'lrr' in optim (known: lr,"),
        (["--set", "run.workers=two"], "error: run.workers must be int, got 'two'"),
        (["--set", "run.workers"], "error: --set takes KEY=VALUE (e.g. optim.lr=1e-3)"),
    ],
    ids=["wrong-key", "wrong-type", "no-value"],
)
def test_a_config_error_is_one_line_and_exit_2(tmp_path, command, extra, message):
    work = tmp_path / "w"
    result = run([*command, str(work), *extra])
    assert result.exit_code == 2, result.output
    lines = error_lines(result.output)
    assert len(lines) == 1 and lines[0].startswith(message), result.output
    log = work / "logs" / f"{command[0]}.log"
    assert lines[0].endswith(f"(log: {log})")
    assert "Traceback (most recent call last)" in log.read_text()


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("optim: {lr: fast}", "error: optim.lr must be float, got 'fast'"),
        ("run: {'[bold]x': 1}", "error: unknown key(s) ['[bold]x'] in run"),  # not markup
    ],
)
def test_a_bad_yaml_value_is_named(tmp_path, yaml_text, message):
    config = tmp_path / "c.yaml"
    config.write_text(yaml_text + "\n")
    result = run([*TRAIN, str(tmp_path / "w"), "--config", str(config)])
    assert result.exit_code == 2
    assert error_lines(result.output)[0].startswith(message), result.output


def test_a_failed_training_is_one_line_naming_the_worker_error(tmp_path, monkeypatch):
    """Ray Train's WorkerGroupError unwrapped to what the worker raised: exit 1."""
    from ray.train import WorkerGroupError

    import oclear_ray.train

    def fails(cfg, **kwargs):
        assert cfg.optim.lr == 0.001  # the --set value, read as a float
        boom = MemoryError("worker 0 ran out of memory")
        raise WorkerGroupError("Worker 0 failed:\nTraceback ...", {0: boom})

    monkeypatch.setattr(cli, "_init_ray", lambda address=None: None)
    monkeypatch.setattr(oclear_ray.train, "fit", fails)
    result = run([*TRAIN, str(tmp_path / "w"), "--set", "optim.lr=1e-3"])
    assert result.exit_code == 1
    stage, error = error_lines(result.output)  # its progress line, then the cause
    assert stage.startswith("train: failed")
    assert error.startswith("error: MemoryError: worker 0 ran out of memory (log: ")
    assert "WorkerGroupError" in (tmp_path / "w" / "logs" / "train.log").read_text()


def test_an_unknown_govern_mode_and_a_missing_input_are_one_line(tmp_path):
    result = run([*PIPELINE, str(tmp_path / "w"), "--govern", "sometimes"])
    assert result.exit_code == 2
    assert error_lines(result.output)[0].startswith("error: --govern must be one of")
    result = run(["search", "--workdir", str(tmp_path / "w"), "--text", "red mug"])
    assert result.exit_code == 2 and len(error_lines(result.output)) == 1
    assert "error: " in result.output and "(log: " in result.output


def test_synth_draws_the_queries_it_is_asked_for(tmp_path):
    out = tmp_path / "data"
    args = ["synth", str(out), "--docs", "40", "--classes", "8", "--image-size", "16"]
    result = run([*args, "--queries-per-class", "3", "--text-query-rate", "0.5"])
    assert result.exit_code == 0, result.output
    queries = [pq.read_table(out / f"{n}.parquet") for n in ("queries", "eval_queries")]
    assert sum(t.num_rows for t in queries) == 8 * 3
    texts = [t for q in queries for t in q.column("text").to_pylist() if t]
    assert 0 < len(texts) < 8 * 3
    default = tmp_path / "default"
    assert run(["synth", str(default), "--docs", "40", "--classes", "8"]).exit_code == 0
    queries = [pq.read_table(default / f"{n}.parquet") for n in ("queries", "eval_queries")]
    assert sum(t.num_rows for t in queries) == 8 * 2
    assert not any(t for q in queries for t in q.column("text").to_pylist())


TINY = {
    "model": TINY_MODEL,
    "data": {"batch_size": 8, "query_batch_size": 4, "doc_as_query_rate": 0.0},
    "schedule": [{"name": "fuse", "steps": 2}],
    "run": {"workers": 1, "checkpoint_every": 100, "log_every": 1},
}
CHATTER = ("PlacementGroup", "TrainingReport", "Execution plan", "(raylet)", "INFO", "WARNING")


@pytest.mark.ray
def test_a_quiet_training_prints_its_progress_and_no_ray_chatter(tmp_path):
    """``oclear train`` as a user runs it (its own process and embedded Ray): the terminal gets
    the progress line and the result; Ray's messages are in WORKDIR/logs/train.log."""
    from oclear_ray.synth import SynthConfig, generate

    generate(str(tmp_path / "data"), SynthConfig(docs=40, classes=8, image_size=32, seed=0))
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    cmd = [str(BIN / "oclear"), *TRAIN[:2], str(tmp_path / "data" / "catalog.parquet")]
    cmd += ["--workdir", str(tmp_path / "w"), "--config", str(tmp_path / "tiny.yaml")]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    terminal = done.stdout + done.stderr
    assert done.returncode == 0, terminal
    assert not [c for c in CHATTER if c in terminal], terminal
    assert "train: done" in terminal and "2 steps" in terminal, terminal
    assert f"model: {tmp_path / 'w' / 'train' / 'model'}" in terminal
    assert len(terminal.splitlines()) < 25, terminal
    log = (tmp_path / "w" / "logs" / "train.log").read_text()
    assert "Execution plan" in log and "Ray's own logs: " in log


def test_the_jobs_take_set_too(monkeypatch):
    """``python -m jobs.train`` / ``jobs.pipeline`` (what ``ray job submit`` runs): the same
    ``--set`` overrides reach the training config."""
    import jobs.pipeline
    import jobs.train

    seen = []

    def capture(cfg, **kwargs):
        seen.append(cfg)
        raise SystemExit(0)

    monkeypatch.setattr(jobs.train, "fit", capture)
    monkeypatch.setattr(jobs.pipeline, "run_pipeline", lambda cfg, log: capture(cfg.train))
    base = ["--catalog", "c.parquet", "--workdir", "w", "--set", "optim.lr=1e-3"]
    for job in (jobs.train, jobs.pipeline):
        with pytest.raises(SystemExit):
            job.main(job.parse_args([*base, "--set", "run.workers=3"]))
    assert [(c.optim.lr, c.run.workers) for c in seen] == [(0.001, 3), (0.001, 3)]
    with pytest.raises(ValueError, match="--set optim.lrr: no key 'lrr' in optim"):
        jobs.train.main(jobs.train.parse_args([*base, "--set", "optim.lrr=1"]))


def test_stage_lines_show_each_stage_its_counts_and_headline():
    """What ``pipeline`` and ``demo`` draw from ``run_pipeline``'s events: one line a stage."""
    import io

    stream = io.StringIO()
    cli.console.width = 120
    with cli._on(stream, stream), cli.StageLines({"train": 10}) as lines:
        lines.log("govern", "running", {})
        tick = lines.callback("govern")
        tick(40), tick(20)
        lines.log("govern", "done", {"choice": {"apply": True}, "version": "v"})
        lines.log("train", "running", {})
        report = lines.callback("train")
        report({"step": 5, "stage": "align", "loss": 2.5, "samples_per_s": 80.0})
        assert lines.bar.tasks[lines.tasks["train"]].completed == 5
        report({"step": 10, "stage": "fuse", "loss": 1.25, "samples_per_s": 90.0})
        lines.log("train", "done", {"steps": 10, "model_version": "m"})
        lines.log("embed", "current", {"embedded": 60, "version": "m"})
    cli.console.width = None  # back to the terminal's
    shown = [line.split() for line in stream.getvalue().splitlines() if line.strip()]
    by_stage = {words[0]: " ".join(words[1:]) for words in shown}
    assert by_stage["govern:"].startswith("done")
    assert "60 documents, class map applied" in by_stage["govern:"]
    assert "10 steps, loss 1.250" in by_stage["train:"]
    assert (
        by_stage["embed:"].startswith("current") and "60 documents embedded" in by_stage["embed:"]
    )
    assert cli.headline("evaluate", {"recall@1": 0.5, "recall@10": 0.75, "n_queries": 8}) == (
        "R@1 0.500, R@10 0.750 (8 queries)"
    )
    views = {"doc_view": "image_only", "shape_weight": 0.0, "shape_levels": None}
    assert cli.headline("train", {"steps": 9, "views": views}, {"loss": 2.0}) == (
        "9 steps, loss 2.000; image_only docs, shape 0"
    )
    views = {"doc_view": "fused", "shape_weight": 2.0, "shape_levels": "ink"}
    assert cli.headline("train", {"steps": 9, "views": views}) == (
        "9 steps; fused docs, shape 2 ink"
    )


def test_a_failure_to_import_is_one_line_too(tmp_path, monkeypatch):
    """The handler itself imports nothing that could fail the same way."""
    import oclear_ray.train

    def broken(cfg, **kwargs):
        raise ImportError("cannot import name 'normalize' from 'oclear_ray.preprocess'")

    monkeypatch.setattr(cli, "_init_ray", lambda address=None: None)
    monkeypatch.setattr(oclear_ray.train, "fit", broken)
    monkeypatch.setitem(sys.modules, "oclear_ray.serve", None)  # importing it would fail
    result = run([*TRAIN, str(tmp_path / "w")])
    assert result.exit_code == 1
    assert error_lines(result.output)[-1].startswith("error: ImportError: cannot import name")


@pytest.mark.parametrize(("flags", "quiet"), [([], True), (["--verbose"], False)])
def test_verbose_leaves_the_terminal_to_ray(tmp_path, monkeypatch, flags, quiet):
    """Quiet by default: a command's output goes through ``quiet_output`` to its log;
    ``--verbose`` (an option of the app, before the command) leaves the terminal as it is."""
    import oclear_ray.runtime as runtime

    logs, real = [], runtime.quiet_output
    monkeypatch.setattr(runtime, "quiet_output", lambda f: logs.append(f) or real(f))
    args = ["synth", str(tmp_path / "d"), "--docs", "20", "--classes", "4", "--image-size", "16"]
    assert run([*flags, *args]).exit_code == 0
    assert logs == ([str(tmp_path / "d" / "logs" / "synth.log")] if quiet else [])
