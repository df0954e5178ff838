"""Two CPU processes (gloo) through `accelerate launch` with the shipped DDP config give the same losses as one
process with the same global batch, and write one set of outputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import CONFIGS, ROOT, run_cli, tiny_config


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["auto", "precomputed"])
def test_two_process_ddp_matches_single_process(tmp_path, reference):
    steps = {"max_steps": 4, "logging_steps": 1, "save_steps": 2, "reference": reference}
    single_cfg = tiny_config(tmp_path, train={**steps, "batch_size": 8}, output={"dir": str(tmp_path / "single")},
                             eval={"enabled": False})
    ddp_cfg = tiny_config(tmp_path, train={**steps, "batch_size": 4}, output={"dir": str(tmp_path / "ddp")},
                          eval={"enabled": False})
    (tmp_path / "single.yaml").write_text(yaml.safe_dump(single_cfg))
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(ddp_cfg))
    # A fresh cache: with reference: precomputed the two DDP ranks each compute half the reference log-probs (the
    # DDP run goes first); the single-process run then recomputes them all (refresh) and must find the same.
    env = dict(os.environ, OMP_NUM_THREADS="1", DPOKIT_CACHE=str(tmp_path / "cache"))

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "accelerate" / "ddp.yaml"),
           # Port 0: the launcher binds a free port itself (a port picked here could be taken before it binds).
           "--num_processes", "2", "--main_process_port", "0",
           "-m", "dpokit", "train", str(tmp_path / "ddp.yaml")]
    ddp = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "train_summary.json").read_text())
    dist = summary["distributed"]  # the strategy actually used: full copies, nothing sharded
    assert (dist["type"], dist["processes"], dist["sharded"]) == ("ddp", 2, False)
    assert dist["parameters"]["per_rank"] == [dist["parameters"]["full"]] * 2
    if reference == "precomputed":
        cache = summary["reference_cache"]
        assert cache["cache"] == "miss" and cache["processes"] == 2 and summary["reference_forwards"]["training"] == 0
        shared = json.loads(Path(cache["path"]).read_text())
        Path(cache["path"]).unlink()  # the single-process run computes every value itself
    single = run_cli("train", tmp_path / "single.yaml", env={"DPOKIT_CACHE": str(tmp_path / "cache")})
    assert single.returncode == 0, single.stderr[-3000:]
    if reference == "precomputed":
        alone = json.loads((tmp_path / "single" / "train_summary.json").read_text())["reference_cache"]
        assert alone["cache"] == "miss" and alone["processes"] == 1
        assert alone["forwards"] > cache["forwards"]  # each DDP rank did about half the forwards
        solo = json.loads(Path(alone["path"]).read_text())
        for split in ("train", "eval"):
            assert len(solo[split]) == len(shared[split])
            for a, b in zip(solo[split], shared[split]):
                assert abs(a[0] - b[0]) < 1e-4 and abs(a[1] - b[1]) < 1e-4

    # One job, one set of outputs: one summary line, one metrics row per step, the same files as one process.
    assert ddp.stdout.count("trained in") == 1  # the closing line (the header names the run folder too)
    def files(run):  # RNG states are per rank by design (rng_state.pth vs rng_state_0/1.pth)
        return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and "rng_state" not in p.name)

    assert files(tmp_path / "ddp") == files(tmp_path / "single")
    assert (tmp_path / "ddp" / "checkpoints" / "checkpoint-4" / "rng_state_1.pth").is_file()  # both ranks saved

    a, b = _rows(tmp_path / "single"), _rows(tmp_path / "ddp")
    logged = [r for r in a if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["epoch"] == rb["epoch"]  # same global batch: 8 pairs per step in both runs
        for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "grad_norm"):
            if key in ra:
                assert abs(ra[key] - rb[key]) <= 1e-4, (ra["step"], key, ra[key], rb[key])
    # The split is seeded: both runs hold the same rows.
    assert (tmp_path / "ddp" / "data" / "train.jsonl").read_text() == (tmp_path / "single" / "data" / "train.jsonl").read_text()


def test_shipped_accelerate_configs_parse():
    """Every launcher config in configs/accelerate loads with accelerate's own parser, as the kind it says."""
    from accelerate.commands.config.config_args import ClusterConfig

    kinds = {"ddp.yaml": ("MULTI_GPU", None), "fsdp.yaml": ("FSDP", None),
             "deepspeed_zero2.yaml": ("DEEPSPEED", 2), "deepspeed_zero3.yaml": ("DEEPSPEED", 3)}
    for name, (kind, stage) in kinds.items():
        cfg = ClusterConfig.from_yaml_file(str(CONFIGS / "accelerate" / name))
        assert str(cfg.distributed_type).endswith(kind), name
        if stage:
            assert cfg.deepspeed_config["zero_stage"] == stage


def test_process_group_is_destroyed_at_exit_after_training():
    """A launched rank that finished training destroys its process group at exit, while Python is alive: a gloo
    group left to interpreter shutdown aborts the rank now and then (SIGABRT after a successful run)."""
    code = """
import atexit
import torch.distributed as dist
from dpokit.train.resilience import destroy_process_group_at_exit
atexit.register(lambda: print("group alive at exit:", dist.is_initialized()))  # runs after dpokit's hook (LIFO)
destroy_process_group_at_exit()  # no group yet: nothing to do
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
destroy_process_group_at_exit()
destroy_process_group_at_exit()  # registered once
print("group alive after training:", dist.is_initialized())
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split("\n")[:2] == ["group alive after training: True", "group alive at exit: False"]


@pytest.mark.parametrize("launched", [{}, {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}])
@pytest.mark.parametrize("argv, code", [(["losses"], 0), (["eval", "/nonexistent-run"], 2)])
def test_a_launched_rank_runs_its_exit_handlers_and_skips_interpreter_shutdown(launched, argv, code):
    """Under a launcher, `dpokit` leaves with its atexit handlers run and its exit code kept, but without Python's
    interpreter shutdown (where gloo's worker threads can abort a finished run: docs/distributed.md); a plain run
    shuts down as usual."""
    script = f"""
import atexit, sys
class Finalized:
    def __del__(self):
        print("interpreter shutdown ran", flush=True)
witness = Finalized()
atexit.register(print, "atexit ran")
sys.argv = ["dpokit", *{argv!r}]
from dpokit.cli import main
main()
"""
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    res = subprocess.run([sys.executable, "-c", script], env={**env, **launched}, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == code, res.stderr[-2000:]
    assert "atexit ran" in res.stdout
    assert ("interpreter shutdown ran" in res.stdout) is not bool(launched), res.stdout[-2000:]
    if code == 2:
        assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: "), res.stderr
