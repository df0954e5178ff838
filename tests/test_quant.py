"""QLoRA: LoRA on a 4-bit (or 8-bit) bitsandbytes base, on the CPU with real bitsandbytes (no mocks): the run
trains only the adapter, the reference is the adapter-disabled quantized base (no second copy), packing stays on
and agrees with the padded layout, and every combination that cannot run stops at plan time with exit 2."""

import json
import math
import sys

import bitsandbytes as bnb
import pytest
import torch
import yaml

from conftest import run_main, tiny_config
from dpokit.core.batching import pad_pairs, sequence_logps
from dpokit.core.config import config_from_dict
from dpokit.core.errors import UserError
from dpokit.core.packing import pack_pairs, packed_sequence_logps
from dpokit.train import trainer as tr
from dpokit.train.plan import plan_training


def qlora_config(tmp_path, quantization="4bit", **train):
    return config_from_dict(tiny_config(
        tmp_path, model={"quantization": quantization},
        train={"lora": {"r": 8, "alpha": 16}, "learning_rate": 5e-3, "max_steps": 6, "batch_size": 8,
               "logging_steps": 1, **train},
        eval={"enabled": False}))


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def trained_4bit(tmp_path_factory):
    """A 6-step 4-bit LoRA run with gradient checkpointing, run stage by stage (run_training's recipe) so the
    test sees the models: (setup, trainer, weights before, weights after, run folder)."""
    tmp = tmp_path_factory.mktemp("qlora")
    plan = plan_training(qlora_config(tmp, gradient_checkpointing=True))
    s = tr.setup(plan)
    before = snapshot(s.model)
    tr.write_run_start(plan, s)
    trainer = tr.build_trainer(plan, s, None)
    output, checkpoint = tr.fit(plan, trainer)
    tr.save(plan, s, trainer, output, 1.0, checkpoint)
    return s, trainer, before, snapshot(s.model), plan.run_dir


def test_base_is_4bit_and_the_reference_is_the_adapter_disabled_base(trained_4bit):
    s, trainer, *_ = trained_4bit
    layers = [m for m in s.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers; the LM head stays unquantized
    assert all(m.weight.quant_state.quant_type == "nf4" for m in layers)
    assert s.ref_model is None and trainer.ref_model is None  # no second copy of the base
    assert trainer.reference_forwards > 0  # the reference ran: the policy with its adapter disabled
    norms = [p for n, p in s.model.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.float32 and not p.requires_grad for p in norms)


def test_step0_is_ln2_loss_falls_and_only_the_adapter_changes(trained_4bit):
    s, trainer, before, after, run_dir = trained_4bit
    assert trainer.step0_check["policy_equals_reference"]
    assert trainer.step0_check["sigmoid_loss"] == pytest.approx(math.log(2), abs=1e-4)
    losses = [row.loss for row in run_dir.read_metrics() if row.loss is not None]
    assert len(losses) >= 5 and losses[-1] < losses[0] - 0.01, losses
    lora = [n for n in before if "lora_" in n]
    assert lora and all(not torch.equal(before[n], after[n]) for n in lora if "lora_B" in n)
    frozen = [n for n in before if "lora_" not in n]
    assert all(torch.equal(before[n], after[n]) for n in frozen)  # the uint8 NF4 bytes included
    assert any(before[n].dtype == torch.uint8 for n in frozen)
    trainable = {n for n, p in s.model.named_parameters() if p.requires_grad}
    assert trainable == set(lora)


def test_packing_stays_on_and_packed_equals_padded_on_the_4bit_model(trained_4bit):
    s, trainer, *_ = trained_4bit
    assert trainer.attention_choice["backend"] == "dense"  # the start-up self-check passed on the 4-bit model
    model = s.model.eval()
    pairs = s.train_enc[:4]
    pad = s.tokenizer.pad_token_id
    with torch.no_grad():
        packed = packed_sequence_logps(model, pack_pairs(pairs, pad))
        padded = sequence_logps(model, pad_pairs(pairs, pad))
    for side in ("chosen", "rejected"):
        assert torch.allclose(packed[side], padded[side], atol=1e-4), (packed[side], padded[side])


def test_saved_run_is_an_adapter(trained_4bit):
    *_, run_dir = trained_4bit
    assert run_dir.is_adapter()
    assert run_dir.read_train_summary().reference == "adapter"


def test_8bit_lora_trains(tmp_path):
    cfg = qlora_config(tmp_path, "8bit", max_steps=3)
    plan = plan_training(cfg)
    s = tr.setup(plan)
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in s.model.modules())
    before = snapshot(s.model)
    trainer = tr.build_trainer(plan, s, None)
    tr.write_run_start(plan, s)
    tr.fit(plan, trainer)
    after = snapshot(s.model)
    assert trainer.step0_check["policy_equals_reference"]
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)
    assert all(torch.equal(before[n], after[n]) for n in before if "lora_" not in n)


@pytest.mark.parametrize(("change", "wanted"), [
    ({"train": {"lora": None}}, ["model.quantization: 4bit trains LoRA adapters only", "train.lora"]),
    ({"train": {"reference": "model"}}, ["train.reference: model would copy the 4bit base", "precomputed"]),
    ({"train": {"engine": "trl"}}, ["train.engine: native"]),
], ids=["full-fine-tune", "reference-copy", "trl"])
def test_plan_refuses_what_a_quantized_base_cannot_run(tmp_path, change, wanted):
    raw = tiny_config(tmp_path, model={"quantization": "4bit"}, train={"lora": {"r": 8}})
    for section, values in change.items():
        raw[section].update(values)
    with pytest.raises(UserError) as err:
        plan_training(config_from_dict(raw))
    for text in wanted:
        assert text in str(err.value)


def test_plan_refuses_fsdp_with_4bit(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(UserError, match="asks for fsdp, which cannot shard bitsandbytes' 4bit weights"):
        plan_training(qlora_config(tmp_path))


def test_train_and_plan_without_bitsandbytes_exit_2_with_the_install_command(tmp_path, capfd, monkeypatch):
    """bitsandbytes absent (None in sys.modules is how Python marks a module that cannot be imported): `dpokit
    train` and `dpokit plan` stop with one line and the install command, before the tokenizer or weights load."""
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, model={"quantization": "4bit"}, train={"lora": {"r": 8}})))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    for command in ("train", "plan"):
        proc = run_main(capfd, command, path)
        assert proc.returncode == 2, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "model.quantization: 4bit needs bitsandbytes" in lines[0], proc.stderr
        assert "pip install 'dpokit[quant]'" in lines[0]
    assert not (tmp_path / "run").exists()


# ---- dpokit plan: a Llama-3-8B-shaped model (config.json only, meta device) on one 24 GB GPU ----------------------

@pytest.fixture(scope="module")
def llama3_8b_config(tmp_path_factory):
    """A run config for a Llama-3-8B-shaped model (its config.json written here, no weights) with the tiny
    tokenizer: LoRA r16, one pair a batch, each prompt+response row 1,024 tokens (the prompt cut from the left)."""
    from transformers import LlamaConfig

    tmp = tmp_path_factory.mktemp("llama3")
    LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                tie_word_embeddings=False).save_pretrained(tmp / "llama3-8b")
    words = "the warm kind answer helps you with a smile and thanks".split()
    rows = [{"prompt": " ".join(words[(i + j) % len(words)] for j in range(1500)),
             "chosen": " ".join(words[(i + 2 * j) % len(words)] for j in range(900)),
             "rejected": " ".join(words[(i + 3 * j) % len(words)] for j in range(900))} for i in range(8)]
    data = tmp / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = {"model": {"name_or_path": str(tmp / "llama3-8b"), "tokenizer": "dpokit-tiny-llama"},
           "data": {"source": str(data), "format": "auto", "eval_fraction": 0.0, "max_length": 1024,
                    "max_prompt_length": 512},
           "train": {"lora": {"r": 16}, "batch_size": 1, "packing": True},
           "eval": {"enabled": False}, "output": {"dir": str(tmp / "run")}}
    path = tmp / "llama3.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_plan_llama3_8b_fits_24gb_with_a_4bit_base_not_without(llama3_8b_config, capfd):
    runs = {}
    for quantization in ("4bit", "none"):
        proc = run_main(capfd, "plan", llama3_8b_config, "--gpu-memory", "24GB", "--json",
                        "--set", f"model.quantization={quantization}")
        assert proc.returncode == 0, proc.stderr
        runs[quantization] = json.loads(proc.stdout)
    q, full = runs["4bit"], runs["none"]
    assert q["settings"]["largest_batch"]["width"] == 1536  # prompt 512 once + two 512-token responses
    assert q["settings"]["params"] == 8_030_261_248  # Llama-3-8B
    assert q["fits"] is True and full["fits"] is False, (q["peak_memory_mb"], full["peak_memory_mb"])
    # weights by hand: the 2 x 128256 x 4096 embedding and head in bf16, the other 6.98e9 at 0.5 byte plus the
    # double-quantized constants (1/64 byte + 4/16384), the LoRA weights in fp32
    vocab_params = 2 * 128256 * 4096
    linear = 8_030_261_248 - vocab_params - (2 * 32 + 1) * 4096
    lora = q["settings"]["trainable_params"]
    expected = (8_030_261_248 - linear) * 2 + linear * (0.5 + 1 / 64 + 4 / 16384) + 4 * lora
    assert q["breakdown_mb"]["weights"] == pytest.approx(expected / 2**20, abs=0.1)
    assert full["breakdown_mb"]["weights"] == pytest.approx((8_030_261_248 * 2 + 4 * lora) / 2**20, abs=0.1)
    assert q["breakdown_mb"]["weights"] < 6000 < 15000 < full["breakdown_mb"]["weights"]
    changes = [s["change"] for s in full["suggestions"] if s["fits"]]
    assert any("4-bit base (QLoRA)" in c for c in changes), full["suggestions"]


# ---- evaluation, report and export of a 4-bit run -------------------------------------------------------------

FRESH_PROCESS_SCORE = r"""
import json, sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from dpokit.core.scoring import pair_logps

base_dir, adapter_dir, pairs_path, pad_id = sys.argv[1:5]
pairs = json.load(open(pairs_path))
base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
assert not getattr(base, "is_quantized", False)
model = PeftModel.from_pretrained(base, adapter_dir).eval()
tuned = pair_logps(model, pairs, int(pad_id))
with model.disable_adapter():
    ref = pair_logps(model, pairs, int(pad_id))
wins = [(tc - bc) > (tr - br) for tc, bc, tr, br in zip(tuned["chosen"], ref["chosen"], tuned["rejected"], ref["rejected"])]
print(json.dumps({"accuracy": sum(wins) / len(wins), "n": len(wins)}))
"""


@pytest.fixture(scope="module")
def evaluated_4bit(trained_4bit):
    from dpokit.eval import evaluate_run

    s, _, _, _, run_dir = trained_4bit
    result = evaluate_run(run_dir.path, overrides=["eval.generate=false"])
    return s, run_dir, result


def test_evaluation_runs_on_the_4bit_model_and_the_report_names_it(evaluated_4bit, monkeypatch):
    from dpokit.eval import load_tuned_and_base
    from dpokit.report import training_rows

    s, run_dir, result = evaluated_4bit
    assert result.preference.n_pairs == len(s.eval_enc) > 0
    tuned, base, _ = load_tuned_and_base(run_dir, run_dir.read_config())
    assert base is None and any(isinstance(m, bnb.nn.Linear4bit) for m in tuned.modules())
    rows = dict(training_rows(run_dir))
    assert rows["quantization"] == "4-bit nf4 (bitsandbytes, double quantization) base, LoRA on top"


def test_exported_adapter_loads_on_the_unquantized_base_in_a_fresh_process(evaluated_4bit, tmp_path):
    """Plain transformers + peft, no dpokit loading code: the adapter goes onto the unquantized tiny base and
    scores the held-out pairs within 0.02 implicit-reward accuracy of the run's own (4-bit) evaluation."""
    import subprocess

    from dpokit.core.models import resolve_model_path
    from dpokit.export import export_run

    s, run_dir, result = evaluated_4bit
    out = export_run(run_dir.path, tmp_path / "adapter")
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == "dpokit-tiny-llama"  # as the user would name it
    card = (out / "README.md").read_text()
    assert "Trained on a quantized base (QLoRA): 4-bit nf4" in card and "unquantized base" in card
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{k: p[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                                 for p in s.eval_enc]))
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS_SCORE, resolve_model_path("dpokit-tiny-llama"),
                           str(out), str(pairs), str(s.tokenizer.pad_token_id)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    assert fresh["n"] == result.preference.n_pairs
    assert fresh["accuracy"] == pytest.approx(result.preference.implicit_reward_accuracy.value, abs=0.02)


def test_merge_goes_onto_the_unquantized_base_and_a_quantized_merge_is_refused(evaluated_4bit, tmp_path):

    from dpokit.export import export_run, merge_adapter

    s, run_dir, _ = evaluated_4bit
    out = export_run(run_dir.path, tmp_path / "merged", merge=True)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"  # fp32: the CPU run's precision
    assert "merged onto the **unquantized** base weights in float32" in (out / "README.md").read_text()
    with pytest.raises(UserError, match="--merge: the base is quantized"):
        merge_adapter(s.model)


# --- resume after a kill, and two DDP processes, on a 4-bit base (slow: real subprocesses) ----------------------

def qlora_yaml(tmp_path, name, **train):
    raw = tiny_config(tmp_path, model={"quantization": "4bit"},
                      train={"lora": {"r": 8, "alpha": 16}, "learning_rate": 5e-3, "logging_steps": 1, **train},
                      eval={"enabled": False}, output={"dir": str(tmp_path / name)})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def logged(run) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def adapter(run) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_4bit_run_killed_after_a_checkpoint_resumes_to_the_straight_run(tmp_path):
    import signal
    import subprocess
    import time

    from conftest import run_cli
    from dpokit.train.checkpoints import last_complete_checkpoint

    steps = {"max_steps": 10, "save_steps": 3, "batch_size": 4}
    straight = run_cli("train", qlora_yaml(tmp_path, "straight", **steps))
    assert straight.returncode == 0, straight.stderr[-3000:]

    config, run = qlora_yaml(tmp_path, "killed", **steps), tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "dpokit", "train", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and last_complete_checkpoint(run / "checkpoints") is None:
        time.sleep(0.01)
    while proc.poll() is None and (not (run / "metrics.jsonl").is_file() or max(logged(run), default=0) < 4):
        time.sleep(0.01)  # past the first checkpoint (step 3), before the second (6)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
    assert not (run / "train_summary.json").exists()

    resumed = run_cli("train", config, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = logged(tmp_path / "straight"), logged(run)
    assert sorted(a) == sorted(b) == list(range(1, 11))
    for step in a:
        for key in ("loss", "rewards/margins", "grad_norm", "learning_rate"):
            assert abs(a[step][key] - b[step][key]) <= 1e-6, (step, key, a[step][key], b[step][key])
    wa, wb = adapter(tmp_path / "straight"), adapter(run)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_two_ddp_processes_on_a_4bit_base_match_one_process(tmp_path):
    import os
    import subprocess

    from conftest import CONFIGS, ROOT, run_cli

    steps = {"max_steps": 4}
    single = run_cli("train", qlora_yaml(tmp_path, "single", batch_size=8, **steps))
    assert single.returncode == 0, single.stderr[-3000:]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "accelerate" / "ddp.yaml"),
           "--num_processes", "2", "--main_process_port", "0",
           "-m", "dpokit", "train", str(qlora_yaml(tmp_path, "ddp", batch_size=4, **steps))]
    ddp = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                         timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "train_summary.json").read_text())
    assert (summary["distributed"]["type"], summary["distributed"]["processes"]) == ("ddp", 2)
    a, b = logged(tmp_path / "single"), logged(tmp_path / "ddp")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        for key in ("loss", "rewards/margins", "grad_norm"):
            assert abs(a[step][key] - b[step][key]) <= 1e-4, (step, key, a[step][key], b[step][key])
