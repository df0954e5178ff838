"""FSDP2 on the CPU (gloo) through `accelerate launch --config_file configs/accelerate/fsdp.yaml`, as a user runs
it, and two machines simulated on one. Real processes, real gloo, the tiny model, a few steps each.

Tolerances: 1e-4 against a 1-process run at the same global batch (the DDP test's, tests/test_distributed.py: a
sharded step sums gradients in another order); 1e-6 for resume vs straight and for two machines vs one (the same
processes doing the same work)."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import CONFIGS, ROOT, run_cli, tiny_config

FSDP_CONFIG = CONFIGS / "accelerate" / "fsdp.yaml"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG)]
TOL = 1e-4  # 2 sharded processes vs 1 process, as tests/test_distributed.py for DDP
EXACT = 1e-6  # the same processes doing the same work (resume, machines)
KEYS = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
        "logps/chosen", "logps/rejected", "eval_loss", "eval_rewards/margins", "eval_rewards/accuracies",
        "eval_logps/chosen")


def _config(tmp_path, name, batch_size, **train):
    # eval_steps 4 = max_steps: the live (sharded) model scores the held-out pairs after its last step; 48 held-out
    # pairs, eval batch 24: equal batches on 1 and 2 processes, so the batch means average to the same number.
    cfg = tiny_config(tmp_path, train={"max_steps": 4, "logging_steps": 1, "save_steps": 2, "eval_steps": 4,
                                       "batch_size": batch_size, **train},
                      eval={"enabled": False, "batch_size": 24}, output={"dir": str(tmp_path / name)})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env(tmp_path):
    return dict(os.environ, OMP_NUM_THREADS="1", DPOKIT_CACHE=str(tmp_path / "cache"))


def _run(cmd, env, timeout=900):
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _summary(run):
    return json.loads((run / "train_summary.json").read_text())


def _assert_same_metrics(a_run, b_run, tol, steps=None):
    a, b = _rows(a_run), _rows(b_run)
    if steps is not None:
        a, b = [r for r in a if r["step"] in steps], [r for r in b if r["step"] in steps]
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert sum("loss" in r for r in a) >= 4 and any("eval_loss" in r for r in a)
    for ra, rb in zip(a, b):
        assert ra.get("epoch") == rb.get("epoch")
        for key in KEYS:
            if key in ra:
                assert abs(ra[key] - rb[key]) <= tol, (ra["step"], key, ra[key], rb[key])


def _files(run):  # RNG states are per rank by design (rng_state.pth vs rng_state_0/1.pth)
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and "rng_state" not in p.name)


def _assert_sharded(summary, processes=2, machines=1):
    dist = summary["distributed"]
    assert (dist["type"], dist["processes"], dist["machines"], dist["sharded"]) == ("fsdp", processes, machines, True)
    full, per_rank = dist["parameters"]["full"], dist["parameters"]["per_rank"]
    assert len(per_rank) == processes and sum(per_rank) == full
    assert all(abs(n - full / processes) <= 0.01 * full for n in per_rank), per_rank


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["model", "precomputed"])
def test_fsdp_shards_every_layer_and_matches_one_process(tmp_path, reference):
    """2 FSDP processes with batch 4 log the same losses, rewards and held-out metrics as 1 process with batch 8,
    and each rank holds half of every wrapped layer (written by tests/fsdp_worker.py when training starts)."""
    env = _env(tmp_path)
    fsdp_cfg = _config(tmp_path, "fsdp", 4, reference=reference)
    single_cfg = _config(tmp_path, "single", 8, reference=reference)
    _run([*LAUNCH, "--num_processes", "2", "--main_process_port", "0",  # port 0: the launcher binds a free one
          str(ROOT / "tests" / "fsdp_worker.py"), str(fsdp_cfg), str(tmp_path / "shards")], env)
    _run([sys.executable, "-m", "dpokit", "train", str(single_cfg)], env)

    fsdp, single = tmp_path / "fsdp", tmp_path / "single"
    summary = _summary(fsdp)
    _assert_sharded(summary)
    assert _summary(single)["distributed"] == {"type": "none", "processes": 1, "machines": 1, "sharded": False,
                                               "zero_stage": None,
                                               "parameters": {"full": summary["distributed"]["parameters"]["full"],
                                                              "per_rank": [summary["distributed"]["parameters"]["full"]]}}
    assert summary["reference"] == reference and summary["step0_check"]["policy_equals_reference"]
    if reference == "precomputed":  # computed by both ranks (half each), none during training
        assert summary["reference_cache"]["processes"] == 2 and summary["reference_forwards"]["training"] == 0
    else:
        assert summary["reference_forwards"]["training"] > 0

    ranks = [json.loads((tmp_path / "shards" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    layers: dict[str, list[int]] = {}
    for name, (local0, full, kind) in ranks[0].items():
        local1 = ranks[1][name][0]
        assert kind == "DTensor" and local0 + local1 == full, (name, local0, local1, full)
        layer = name.split(".self_attn")[0].split(".mlp")[0].split(".input_layernorm")[0].split(
            ".post_attention_layernorm")[0]
        sums = layers.setdefault(layer, [0, 0, 0])
        sums[0], sums[1], sums[2] = sums[0] + local0, sums[1] + local1, sums[2] + full
    assert {"model.layers.0", "model.layers.1", "model.embed_tokens.weight"} <= layers.keys()
    for layer, (local0, local1, full) in layers.items():
        assert 0.4 * full <= local0 <= 0.6 * full and 0.4 * full <= local1 <= 0.6 * full, (layer, local0, local1, full)

    _assert_same_metrics(single, fsdp, TOL)
    assert (fsdp / "data" / "train.jsonl").read_text() == (single / "data" / "train.jsonl").read_text()


def _held_out_metrics(run: Path) -> dict:
    """DPO loss and rewards of run/model on the run's held-out pairs, the model loaded by plain transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpokit.core.models import load_model
    from dpokit.core.run import RunDir
    from dpokit.core.scoring import pair_logps
    from dpokit.data.encode import encode_rows

    cfg = RunDir(run).read_config()
    tuned = AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    rows = [json.loads(line) for line in (run / "data" / "eval.jsonl").read_text().splitlines()]
    encoded, _ = encode_rows(rows, tokenizer, cfg.data)
    base = load_model(cfg.model.name_or_path, dtype="float32")
    t = pair_logps(tuned.eval(), encoded, tokenizer.pad_token_id, batch_size=24)
    b = pair_logps(base.eval(), encoded, tokenizer.pad_token_id, batch_size=24)
    beta = cfg.train.beta
    chosen = beta * (torch.tensor(t["chosen"]) - torch.tensor(b["chosen"]))
    rejected = beta * (torch.tensor(t["rejected"]) - torch.tensor(b["rejected"]))
    return {"eval_loss": float(-torch.nn.functional.logsigmoid(chosen - rejected).mean()),
            "eval_rewards/margins": float((chosen - rejected).mean()),
            "eval_rewards/accuracies": float((chosen > rejected).float().mean()),
            "eval_logps/chosen": float(torch.tensor(t["chosen"]).mean())}


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_exactly_and_saved_model_loads_in_transformers(tmp_path):
    """`accelerate launch ... -m dpokit train` under FSDP: resumed from its step-2 checkpoint, the run ends as the
    straight run did; the model/ it saved (gathered full weights) scores the held-out pairs as the live sharded
    model did after its last step."""
    from safetensors.torch import load_file

    env = _env(tmp_path)
    cfg = _config(tmp_path, "straight", 4)
    cmd = [*LAUNCH, "--num_processes", "2", "--main_process_port", "0", "-m", "dpokit", "train"]
    straight = _run([*cmd, str(cfg)], env)
    assert straight.stdout.count("trained in") == 1  # one job, one summary line
    run = tmp_path / "straight"
    _assert_sharded(_summary(run))

    # A crash after the step-2 checkpoint, simulated: the later checkpoint and the outputs are gone.
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    for gone in ("checkpoints/checkpoint-4", "model", "train_summary.json"):
        shutil.rmtree(resumed / gone) if (resumed / gone).is_dir() else (resumed / gone).unlink()
    resumed_cfg = _config(tmp_path, "resumed", 4)
    _run([*cmd, str(resumed_cfg), "--resume"], env)
    assert _summary(resumed)["resumed_from"] == "checkpoint-2"
    _assert_sharded(_summary(resumed))
    _assert_same_metrics(run, resumed, EXACT)
    wa, wb = load_file(run / "model" / "model.safetensors"), load_file(resumed / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=EXACT, rtol=0), name

    # model/ holds the full weights (every parameter at full size), and plain transformers scores with them.
    full = _summary(run)["distributed"]["parameters"]["full"]
    assert sum(t.numel() for t in wa.values()) >= full
    live = [r for r in _rows(run) if "eval_loss" in r][-1]
    assert live["step"] == 4
    for key, value in _held_out_metrics(run).items():
        assert abs(value - live[key]) <= TOL, (key, value, live[key])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_machines_simulated_on_one_equal_two_processes_on_one(tmp_path):
    """Two `accelerate launch` commands, --num_machines 2 and --machine_rank 0/1 on 127.0.0.1, one process each,
    write one run folder that equals the 2-process single-machine run's."""
    env = _env(tmp_path)
    one = _run([*LAUNCH, "--num_processes", "2", "--main_process_port", "0", "-m", "dpokit", "train",
                str(_config(tmp_path, "one_machine", 4))], env)
    cfg = _config(tmp_path, "two_machines", 4)
    port = str(_free_port())  # both launchers must know it; taken between here and the bind: a rare retry
    procs = [subprocess.Popen([*LAUNCH, "--num_processes", "2", "--num_machines", "2", "--machine_rank", str(rank),
                               "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                               "-m", "dpokit", "train", str(cfg)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=900))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, (_, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-4000:]
    assert outs[0][0].count("trained in") == 1 and "trained in" not in outs[1][0]  # machine 1 prints nothing
    assert one.stdout.count("trained in") == 1

    a, b = tmp_path / "one_machine", tmp_path / "two_machines"
    assert _files(a) == _files(b)
    assert (b / "checkpoints" / "checkpoint-4" / "rng_state_1.pth").is_file()  # machine 1's rank saved its part
    _assert_sharded(_summary(b), machines=2)
    assert _summary(a)["distributed"]["parameters"] == _summary(b)["distributed"]["parameters"]
    _assert_same_metrics(a, b, EXACT)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallbacks checked here are those of a CPU-only machine")
@pytest.mark.parametrize("env, train, reason", [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, {}, "asks for FSDP version 1; on a CPU-only machine"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, {"engine": "trl"}, "train.engine: trl does not shard"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, {}, "DeepSpeed"),
])
def test_launcher_config_that_would_fall_back_stops_before_training(tmp_path, monkeypatch, env, train, reason):
    """What `accelerate launch --config_file X.yaml` exports, where X would silently run plain data parallel here:
    the plan stops with the reason and the fix (exit 2 from the CLI), before any weights load."""
    from dpokit.core.config import config_from_dict
    from dpokit.core.errors import UserError
    from dpokit.train.plan import plan_training

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cfg = config_from_dict(tiny_config(tmp_path, train=train))
    with pytest.raises(UserError, match=reason):
        plan_training(cfg)
    assert not (tmp_path / "run").exists()


def test_fsdp_launcher_asking_for_fsdp1_on_cpu_exits_2(tmp_path):
    """The same through the CLI: exit 2, one line, nothing written."""
    if torch.cuda.is_available():
        pytest.skip("a CPU-only machine's fallback")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tmp_path)))
    res = run_cli("train", cfg, env={"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})
    assert res.returncode == 2, res.stderr[-2000:]
    assert "launch config asks for FSDP version 1" in res.stderr and "fsdp_version: 2" in res.stderr
    assert not (tmp_path / "run").exists()
