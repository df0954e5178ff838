"""train.report_to: metrics also go to the experiment trackers transformers supports (TensorBoard here)."""

import pytest
import yaml

from conftest import tiny_config
from dpokit.train.trackers import check_report_to, report_to_list


def test_report_to_normalises_to_training_arguments():
    assert report_to_list("none") == [] and report_to_list([]) == [] and report_to_list(None) == []
    assert report_to_list("tensorboard") == ["tensorboard"]
    assert report_to_list(["tensorboard", "wandb"]) == ["tensorboard", "wandb"]
    assert report_to_list("all") == ["all"]


def test_check_report_to_names_the_problem_and_the_fix(monkeypatch):
    import dpokit.train.trackers as trackers

    assert check_report_to("none") == [] and check_report_to("all") == []
    [unknown] = check_report_to(["nope"])
    assert unknown.startswith("train.report_to: unknown tracker 'nope'") and "tensorboard" in unknown
    monkeypatch.setattr(trackers, "_available", lambda name: name != "tensorboard")
    assert check_report_to("tensorboard") == ["train.report_to: tensorboard needs `pip install tensorboard`"]
    assert check_report_to(["wandb"]) == []
    assert check_report_to(["none", "wandb"])[0].startswith("train.report_to:")


def test_unknown_tracker_is_refused_before_training(cli, tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, train={"report_to": "nosuch"})), encoding="utf-8")
    res = cli("train", path, "--no-eval")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "train.report_to" in lines[0] and "nosuch" in lines[0]
    assert not (tmp_path / "run").exists()


def test_tensorboard_event_file_under_the_run_folder(cli, tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    cfg = tiny_config(tmp_path, train={"report_to": "tensorboard", "max_steps": 3, "batch_size": 4},
                      eval={"enabled": False}, output={"dir": str(run)})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    res = cli("train", path, "--no-eval", env={"TENSORBOARD_LOGGING_DIR": str(tmp_path / "elsewhere")})
    assert res.returncode == 0, res.stderr[-2000:]
    events = list((run / "logs").glob("events.out.tfevents.*"))
    assert events, sorted(p.relative_to(run).as_posix() for p in run.rglob("*"))
    assert not (tmp_path / "elsewhere").exists()  # the run folder wins over a stale environment value

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "logs"))
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"]
    assert [e.step for e in acc.Scalars("train/loss")][-1] == 3
