"""Crash recovery: a real SIGKILL at a random step, then `--resume`, ends where an uninterrupted run ends; SIGTERM
stops after saving a checkpoint; half-written checkpoints are never resumed from."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import run_cli, tiny_config
from dpokit.train.checkpoints import last_complete_checkpoint

MAX_STEPS = 24


def _config(tmp_path, name):
    cfg = tiny_config(tmp_path, train={"max_steps": MAX_STEPS, "save_steps": 4, "save_total_limit": 2,
                                       "logging_steps": 1, "warmup_steps": 3},
                      output={"dir": str(tmp_path / name)})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _metrics(run: Path) -> dict[int, dict]:
    """Logged rows by step; timing fields (which differ between runs) left out."""
    rows = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            rows[row["step"]] = row
    return rows


def _last_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


def _interrupt_at(config: Path, run: Path, target: int, sig: int) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-m", "dpokit", "train", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and _last_step(run) < target:
        time.sleep(0.002)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _assert_same_run(a: Path, b: Path) -> None:
    ma, mb = _metrics(a), _metrics(b)
    assert sorted(ma) == sorted(mb) == list(range(1, MAX_STEPS + 1))
    for step in ma:
        for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "grad_norm",
                    "learning_rate"):
            assert abs(ma[step][key] - mb[step][key]) <= 1e-6, (step, key, ma[step][key], mb[step][key])
    ea = json.loads((a / "eval.json").read_text())["preference"]
    eb = json.loads((b / "eval.json").read_text())["preference"]
    assert abs(ea["reward_margin"]["value"] - eb["reward_margin"]["value"]) <= 1e-6
    assert ea["implicit_reward_accuracy"]["value"] == eb["implicit_reward_accuracy"]["value"]
    sa = json.loads((a / "train_summary.json").read_text())
    sb = json.loads((b / "train_summary.json").read_text())
    assert sa["global_step"] == sb["global_step"] == MAX_STEPS


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    res = run_cli("train", _config(tmp, "run"))
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp / "run"


@pytest.mark.slow
def test_sigkill_at_random_step_then_resume_matches_uninterrupted(tmp_path, reference_run):
    target = random.Random(os.urandom(8)).randint(5, 16)
    config = _config(tmp_path, "run")
    run = tmp_path / "run"
    killed = _interrupt_at(config, run, target, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL, f"run ended before the kill (target step {target})"
    assert not (run / "train_summary.json").exists()
    assert last_complete_checkpoint(run / "checkpoints") is not None

    resumed = run_cli("train", config, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(reference_run, run)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_stops(tmp_path, reference_run):
    config = _config(tmp_path, "run")
    run = tmp_path / "run"
    stopped = _interrupt_at(config, run, 7, signal.SIGTERM)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    last = _last_step(run)
    message = stopped.stderr.strip().splitlines()[-1]
    assert "stopped by SIGTERM" in message and "--resume" in message
    # The checkpoint is of the step where it stopped, not the last periodic one.
    assert Path(last_complete_checkpoint(run / "checkpoints")).name == f"checkpoint-{last}"
    assert not (run / "model").exists() and not (run / "train_summary.json").exists()
    resumed = run_cli("train", config, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(reference_run, run)


def test_resume_ignores_half_written_checkpoints(tmp_path):
    ckpts = tmp_path / "checkpoints"
    (ckpts / "checkpoint-3").mkdir(parents=True)
    (ckpts / "checkpoint-3" / "trainer_state.json").write_text('{"global_step": 3}')
    (ckpts / "checkpoint-6").mkdir()  # a save killed before the trainer state was written
    (ckpts / "checkpoint-6" / "model.safetensors").write_bytes(b"partial")
    (ckpts / ".staging" / "checkpoint-9").mkdir(parents=True)  # a save killed before the rename
    (ckpts / ".staging" / "checkpoint-9" / "trainer_state.json").write_text('{"global_step": 9}')
    assert Path(last_complete_checkpoint(ckpts)).name == "checkpoint-3"
    assert last_complete_checkpoint(tmp_path / "nowhere") is None
