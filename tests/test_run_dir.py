"""The run folder as a typed contract: train -> eval -> report -> export writes artifacts that round-trip through
the models of dpokit.core.run, and a folder of another schema version is refused in one line."""

import json
import shutil

import pytest
import yaml

from conftest import CONFIGS, run_cli, run_main
from dpokit.core.config import load_config
from dpokit.core.run import (
    SCHEMA_VERSION,
    DataReport,
    EvalResult,
    EvalSample,
    MetricsRow,
    RunDir,
    RunManifest,
    TrainSummary,
)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("contract")
    run = tmp / "run"
    sets = [f"output.dir={run}", "train.epochs=1", "eval.num_prompts=4", "eval.max_new_tokens=8",
            "data.truncation=drop", "data.max_length=26"]
    res = run_cli("train", CONFIGS / "tiny.yaml", *[a for s in sets for a in ("--set", s)])
    assert res.returncode == 0, res.stderr[-3000:]
    for args in (["report", run], ["export", run, "--out", tmp / "exported"]):
        res = run_cli(*args)
        assert res.returncode == 0, res.stderr[-3000:]
    return RunDir(run), sets


def _round_trip(model, path):
    raw = json.loads(path.read_text(encoding="utf-8"))
    typed = model.model_validate(raw)
    again = json.loads(json.dumps(typed.model_dump(mode="python")))
    assert again == json.loads(json.dumps(raw)), path  # nothing lost or renamed on the way through the model
    return typed


def test_every_artifact_round_trips_through_its_model(finished_run):
    run, sets = finished_run
    manifest = _round_trip(RunManifest, run.manifest)
    assert manifest.schema_version == SCHEMA_VERSION
    assert run.read_config() == load_config(CONFIGS / "tiny.yaml", sets)
    assert yaml.safe_load(run.config.read_text())["schema_version"] == SCHEMA_VERSION
    report = _round_trip(DataReport, run.data_report)
    summary = _round_trip(TrainSummary, run.train_summary)
    result = _round_trip(EvalResult, run.eval_result)
    assert all(a.schema_version == SCHEMA_VERSION for a in (report, summary, result))
    samples = [EvalSample.model_validate(json.loads(line)) for line in run.eval_samples.read_text().splitlines()]
    assert len(samples) == result.generation.n_samples == 4
    rows = [MetricsRow.model_validate(json.loads(line)) for line in run.metrics.read_text().splitlines()]
    assert rows and rows[-1].step == summary.global_step
    assert run.read_eval_samples() == samples and run.read_metrics() == rows
    assert run.report_html.is_file() and run.training_args.is_file() and run.has_model()


def test_train_jsonl_holds_exactly_the_pairs_trained_on(finished_run):
    run, _ = finished_run
    report = run.read_data_report()
    dropped = report.train_tokenization.dropped_over_max_length
    assert dropped > 0, "the fixture's max_length must drop some pairs for this test to mean anything"
    trained = run.read_train_pairs()
    assert len(trained) == report.n_train == run.read_train_summary().pairs_trained
    assert report.train_tokenization.pairs == len(trained) + dropped


def test_eval_settings_change_with_set_and_are_recorded(finished_run, tmp_path, capfd):
    # On a copy: this re-evaluation rewrites eval.json, which the other tests read from the shared run (any order).
    run = RunDir(shutil.copytree(finished_run[0].path, tmp_path / "run"))
    res = run_cli("eval", run.path, "--set", "eval.num_prompts=2", "--set", "eval.max_new_tokens=4",
                  "--set", "eval.seed=7")
    assert res.returncode == 0, res.stderr[-3000:]
    result = run.read_eval()
    assert result.settings.num_prompts == 2 and result.settings.seed == 7
    assert result.generation.n_prompts == 2 and result.generation.decoding.max_new_tokens == 4
    assert run.read_config().eval.num_prompts == 4  # the run's own config is untouched
    for bad, needle in ((["--set", "train.beta=0.5"], "only eval settings"),
                        (["--set", "eval.num_prompts=0"], "eval.num_prompts"),
                        (["--set", "eval.judge=sentimnt"], "sentiment"),
                        (["--set", "evalnum_prompts"], "section.key=value")):
        before = run.eval_result.read_bytes()
        res = run_main(capfd, "eval", run.path, *bad)   # in this process: the same entry point, no 5 s start
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and needle in lines[0], (bad, res.stderr[-2000:])
        assert run.eval_result.read_bytes() == before


def test_another_schema_version_is_refused_in_one_line(finished_run, tmp_path):
    run, _ = finished_run
    copy = RunDir(tmp_path / "copy")
    copy.path.mkdir()
    for name in ("config.yaml", "run.json", "eval.json", "eval_samples.jsonl", "metrics.jsonl"):
        (copy.path / name).write_bytes((run.path / name).read_bytes())
    result = json.loads(copy.eval_result.read_text())
    result["schema_version"] = SCHEMA_VERSION + 1
    copy.eval_result.write_text(json.dumps(result))
    res = run_cli("report", copy.path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
    assert "eval.json" in lines[0] and f"schema_version {SCHEMA_VERSION + 1}" in lines[0]
    assert not copy.report_html.exists()
