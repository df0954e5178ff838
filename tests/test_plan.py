"""`dpokit plan`: the estimate's parts against hand-derived numbers and the real tiny model, the CLI's JSON, the
fits verdict and its suggestions, and bad input. The --measure comparison is in the slow suite."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from conftest import CONFIGS, run_cli, run_main
from dpokit.core.config import LoraConfig, load_config
from dpokit.core.logp_head import head_plan
from dpokit.core.packing import pack_pairs, packed_sequence_logps
from dpokit.train import estimate as est

MB = 2**20
# dpokit-tiny-llama (dpokit/core/models.py): hidden 64, MLP 128, 2 layers, 4 heads, 2 KV heads of 16, untied head.
# Per layer q 64*64 + k 64*32 + v 64*32 + o 64*64 + gate/up/down 3*64*128 + two norms 2*64 = 36,992; plus the
# embedding and the head (V*64 each) and the final norm (64).
TINY_PARAMS_WITHOUT_VOCAB = 2 * 36_992 + 64


@pytest.fixture(scope="module")
def tiny_cfg():
    return load_config(CONFIGS / "tiny.yaml")


@pytest.fixture(scope="module")
def tiny_shape(tiny_cfg):
    return est.model_shape(tiny_cfg)


@pytest.fixture(scope="module")
def tiny_lengths(tiny_cfg):
    return est.data_lengths(tiny_cfg)


def test_param_counts_equal_the_real_model_and_the_hand_count(tiny_shape, tiny_llama):
    model, _ = tiny_llama
    assert tiny_shape.params == sum(p.numel() for p in model.parameters())
    assert tiny_shape.params == 2 * 64 * tiny_shape.vocab + TINY_PARAMS_WITHOUT_VOCAB
    assert tiny_shape.embedding_params == 64 * tiny_shape.vocab and not tiny_shape.tied
    assert (tiny_shape.hidden, tiny_shape.intermediate, tiny_shape.layers, tiny_shape.heads) == (64, 128, 2, 4)


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]], ids=str)
def test_lora_count_equals_peft_on_the_real_model(tiny_llama, tiny_cfg, targets):
    model, _ = tiny_llama
    lora = LoraConfig(r=8, target_modules=targets)
    peft_model = get_peft_model(copy.deepcopy(model), PeftLoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                                                      task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert est.lora_param_count(model, lora) == trainable
    # by hand, r * (in + out) per adapted layer, 2 layers
    per_layer = {"all-linear": 8 * (128 + 96 + 96 + 128 + 3 * 192), "q_proj,v_proj": 8 * (128 + 96)}
    assert trainable == 2 * per_layer[targets if isinstance(targets, str) else ",".join(targets)]


def test_weights_gradients_and_adamw_bytes(tiny_cfg, tiny_shape, tiny_lengths):
    """fp32 on CPU: weights, gradients 4 bytes a parameter, AdamW two fp32 states (8 bytes); the reference copy
    4 bytes; LoRA trains only its adapters (fp32), and the adapter stands in for the reference."""
    p = tiny_shape.params
    full = est.estimate(tiny_cfg, tiny_shape, tiny_lengths, est.Target("cpu", memory_mb=None), "model")
    b = full.breakdown_mb
    assert b["weights"] == round(4 * p / MB, 1) and b["gradients"] == round(4 * p / MB, 1)
    assert b["optimizer"] == round(8 * p / MB, 1) and b["reference_model"] == round(4 * p / MB, 1)
    assert full.fits is None
    lora_cfg = load_config(CONFIGS / "tiny.yaml", ["train.lora.r=8"])
    lora_shape = est.model_shape(lora_cfg)
    lora = est.estimate(lora_cfg, lora_shape, tiny_lengths, est.Target("cpu"), "adapter")
    assert lora.settings["trainable_params"] == lora_shape.lora_params == 2 * 8 * (128 + 96 + 96 + 128 + 3 * 192)
    assert lora.breakdown_mb["optimizer"] == round(8 * lora_shape.lora_params / MB, 1)
    assert "reference_model" not in lora.breakdown_mb
    # ZeRO-3 over 4 GPUs shards weights, gradients and optimizer state (bf16 weights on a GPU: 2 bytes)
    z3 = est.estimate(tiny_cfg, tiny_shape, tiny_lengths, est.Target("cuda", gpus=4, sharding="zero3"), "model")
    assert z3.breakdown_mb["optimizer"] == round(2 * 2 * p / 4 / MB, 1)
    assert z3.breakdown_mb["weights"] == round(2 * p / 4 / MB, 1)


def test_activation_estimate_matches_autograd_saved_tensors(tiny_llama, tiny_shape):
    """The activation formula against what autograd really keeps for one packed pair on the tiny model: the sum of
    distinct non-parameter storages saved for backward. The chunked log-prob head (core/logp_head.py) keeps its
    logits on its autograd context, not as saved tensors, so they are not in this sum (the estimate counts them
    apart, in logits_bytes)."""
    model, _ = tiny_llama
    model.train()
    g = torch.Generator().manual_seed(0)
    pair = {k: torch.randint(5, 500, (n,), generator=g).tolist()
            for k, n in (("prompt_ids", 20), ("chosen_ids", 20), ("rejected_ids", 20))}
    batch = pack_pairs([pair], pad_id=0)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = max(saved.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        packed_sequence_logps(model, batch)
    scored = len(batch["score_pos"])
    assert not isinstance(head_plan(model), str)  # the tiny LLaMA takes the chunked head
    measured = sum(saved.values())
    predicted = est.activation_bytes(tiny_shape, est.Batch(rows=1, width=60, scored=scored, pairs=1), 4, False, False)
    assert predicted == pytest.approx(measured, rel=0.1)
    # by hand: per token and layer 10h + 4i + heads + width = 640 + 512 + 4 + 60, 2 layers, + 3h; 60 tokens, fp32
    assert predicted == 4 * 60 * (2 * (640 + 512 + 4 + 60) + 192)
    checkpointed = est.activation_bytes(tiny_shape, est.Batch(1, 60, scored, 1), 4, True, False)
    assert checkpointed < predicted


def test_fits_flips_with_the_limit_and_suggestions_lower_the_peak(tiny_cfg, tiny_shape, tiny_lengths):
    roomy = est.estimate(tiny_cfg, tiny_shape, tiny_lengths, est.Target("cuda", memory_mb=80 * 1024), "model")
    assert roomy.fits is True
    assert roomy.breakdown_mb["cuda_context"] == est.CUDA_CONTEXT_MB  # fixed per device: no suggestion lowers it
    small = est.Target("cuda", memory_mb=est.CUDA_CONTEXT_MB + (roomy.peak_memory_mb - est.CUDA_CONTEXT_MB) * 0.8)
    tight = est.estimate(tiny_cfg, tiny_shape, tiny_lengths, small, "model")
    assert tight.fits is False
    options = est.suggestions(tiny_cfg, tiny_shape, tiny_lengths, small, "model", tight)
    changes = " | ".join(s["change"] for s in options)
    for needle in ("train.lora", "reference=precomputed", "gradient_checkpointing", "ZeRO-3"):
        assert needle in changes, changes
    assert all(s["peak_memory_mb"] < tight.peak_memory_mb for s in options), options
    assert any(s["fits"] for s in options)


def test_time_is_flops_over_throughput(tiny_cfg, tiny_shape, tiny_lengths):
    """Full fine-tune with a reference model: 6 FLOPs per weight per token to train, 2 for the reference forward
    (body on every token, LM head on scored tokens only)."""
    target = est.Target("cpu", flops_per_second=1e9)
    e = est.estimate(tiny_cfg, tiny_shape, tiny_lengths, target, "model")
    body = tiny_shape.params - 2 * 64 * tiny_shape.vocab
    forward = 2 * body * sum(tiny_lengths.pair) + 2 * 64 * tiny_shape.vocab * sum(tiny_lengths.scored)
    assert e.time["flops_per_epoch"] == 4 * forward
    assert e.seconds_per_epoch == pytest.approx(4 * forward / 1e9, rel=1e-3)
    pre = est.estimate(tiny_cfg, tiny_shape, tiny_lengths, target, "precomputed")
    assert pre.time["flops_per_epoch"] == 3 * forward


@pytest.mark.parametrize("text,mb", [("80GB", 80 * 1024), ("24000MB", 24000), ("0.5 GiB", 512)])
def test_parse_memory(text, mb):
    assert est.parse_memory(text) == mb


def test_cli_json_fits_and_suggestions(capfd):
    res = run_main(capfd, "plan", CONFIGS / "tiny.yaml", "--json", "--gpu-memory", "80GB")
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert out["fits"] is True and out["suggestions"] == []
    assert out["peak_memory_mb"] == pytest.approx(sum(out["breakdown_mb"].values()), abs=0.5)
    assert out["seconds_per_epoch"] > 0 and out["settings"]["device"] == "cuda"
    res = run_main(capfd, "plan", CONFIGS / "tiny.yaml", "--gpu-memory", "2MB")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "DOES NOT FIT" in res.stdout and "to make it fit" in res.stdout
    assert "train.reference=precomputed" in res.stdout and "train.lora" in res.stdout


@pytest.mark.parametrize("args,needles", [
    (["--gpu-memory", "80XB"], ["--gpu-memory", "80XB", "80GB"]),
    (["--gpus", "0"], ["--gpus", "1 or more"]),
    (["--shard", "zero9"], ["--shard", "zero3"]),
    (["--set", "train.bta=1"], ["train.bta", "unknown key"]),
    # the static checks of `dpokit train` (plan_training) run in `dpokit plan` too: a mistyped judge passed before
    (["--set", "eval.judge=sentimnt"], ["eval.judge", "sentimnt", "did you mean 'sentiment'"]),
], ids=["gpu-memory", "gpus", "shard", "config-key", "judge"])
def test_bad_input_is_one_line_exit_2(args, needles, capfd, tmp_path):
    res = run_main(capfd, "plan", CONFIGS / "tiny.yaml", "--set", f"output.dir={tmp_path / 'run'}", *args)
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.stderr, res.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.slow
def test_measure_tiny_within_25_percent():
    res = run_cli("plan", CONFIGS / "tiny.yaml", "--json", "--measure")
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads(res.stdout)["measured"]
    assert m["steps"] == 3 and m["seconds_per_step"] > 0
    assert 0.75 <= m["memory_ratio"] <= 1.25, m


def test_plan_refuses_an_existing_run_folder_as_train_does(capfd, tmp_path):
    """`dpokit train` stops at planning on a non-empty output.dir without --overwrite; so does `dpokit plan`, and
    the same --overwrite lets both through (the plan deletes nothing)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "mine.txt").write_text("the user's file", encoding="utf-8")
    common = ["plan", CONFIGS / "tiny.yaml", "--json", "--gpu-memory", "80GB", "--set", f"output.dir={run}"]
    res = run_main(capfd, *common)
    assert res.returncode == 2 and "output.dir" in res.stderr and "--overwrite" in res.stderr, res.stderr
    assert res.stdout == ""
    res = run_main(capfd, *common, "--overwrite")
    assert res.returncode == 0, res.stderr[-2000:]
    assert (run / "mine.txt").read_text(encoding="utf-8") == "the user's file"


@pytest.mark.slow
def test_cpu_plan_total_is_the_peak_resident_memory_of_train(tmp_path):
    """On the CPU the plan's total includes the training process itself (the `process` line), so it is within
    25% of the peak resident memory of the same `dpokit train` (ru_maxrss of the child; what /usr/bin/time -v
    reports). Without that line the plan said ~45 MB against a ~1 GB peak."""
    sets = ["--set", f"output.dir={tmp_path / 'run'}"]
    res = run_cli("plan", CONFIGS / "tiny.yaml", "--json", "--no-eval", *sets)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert out["settings"]["device"] == "cpu" and out["breakdown_mb"]["process"] > 300, out["breakdown_mb"]
    # A fresh wrapper whose only child is the training, so its children's high-water mark is the training's.
    wrapper = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", "dpokit", "train",
                          str(CONFIGS / "tiny.yaml"), "--no-eval", *sets], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    peak_mb = int(res.stdout.split()[-1]) / 1024  # ru_maxrss is in KiB on Linux
    assert 0.75 <= peak_mb / out["peak_memory_mb"] <= 1.25, (peak_mb, out["peak_memory_mb"], out["breakdown_mb"])


def test_process_memory_is_measured_once_per_interpreter_and_library_versions(tmp_path, monkeypatch):
    """The `process` line costs a fresh interpreter importing the training stack (seconds), so it is kept in the
    dpokit cache under the interpreter and the libraries' versions: a second plan reads it, another key measures
    again."""
    from dpokit.train import resources

    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path))
    resources.training_process_mb.cache_clear()
    monkeypatch.setattr(resources, "_training_stack_key", lambda: "python-a torch=1")
    measured = resources.training_process_mb()
    assert 300 < measured < 4000, measured   # torch and transformers imported, nothing trained
    stored = json.loads((tmp_path / "training_process_mb.json").read_text(encoding="utf-8"))
    assert stored == {"python-a torch=1": measured}
    # Read back, not measured: a value no measurement gives proves the file is what answers.
    (tmp_path / "training_process_mb.json").write_text(json.dumps({"python-a torch=1": 123.0}), encoding="utf-8")
    resources.training_process_mb.cache_clear()
    assert resources.training_process_mb() == 123.0
    # An upgrade (another key) measures again and keeps the other entry.
    monkeypatch.setattr(resources, "_training_stack_key", lambda: "python-a torch=2")
    resources.training_process_mb.cache_clear()
    again = resources.training_process_mb()
    assert 300 < again < 4000 and again != 123.0
    assert set(json.loads((tmp_path / "training_process_mb.json").read_text(encoding="utf-8"))) == {
        "python-a torch=1", "python-a torch=2"}
    resources.training_process_mb.cache_clear()
