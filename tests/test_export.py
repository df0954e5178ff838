"""`dpokit export`: a LoRA run merged into a plain transformers folder generates exactly what the adapter model
generates (greedy), and carries a model card with base model, data, config and evaluation."""

import json

import pytest
import torch

from conftest import run_cli, tiny_config
from dpokit.core.config import config_from_dict

PROMPTS = ["How was the sea?", "Tell me about the garden.", "Give a review of the movie."]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from dpokit.eval import evaluate_run
    from dpokit.train.trainer import run_training

    tmp = tmp_path_factory.mktemp("lora")
    cfg = tiny_config(tmp, train={"max_steps": 6, "learning_rate": 1e-2, "lora": {"r": 8}})
    result = run_training(config_from_dict(cfg))
    evaluate_run(result.run_dir, quiet=True)  # training no longer evaluates: the caller chains it
    return tmp / "run"


def _greedy(model, tokenizer, prompt):
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids["input_ids"].shape[1]:].tolist()


def test_merged_export_generates_like_the_adapter_model(lora_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpokit.core.models import load_model

    out = tmp_path / "export"
    res = run_cli("export", lora_run, "--out", out, "--merge")
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin")) and not (out / "adapter_config.json").exists()

    # Plain transformers, no dpokit and no peft involved in loading the export.
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    adapter = PeftModel.from_pretrained(load_model("dpokit-tiny-llama", dtype="float32"), str(lora_run / "model")).eval()
    for prompt in PROMPTS:
        assert _greedy(exported, tokenizer, prompt) == _greedy(adapter, tokenizer, prompt), prompt
    # The merge really changed the weights (the adapter is not a no-op).
    base = load_model("dpokit-tiny-llama", dtype="float32")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(dict(base.named_parameters())[name], dict(exported.named_parameters())[name])

    card = (out / "README.md").read_text()
    evaluation = json.loads((lora_run / "eval.json").read_text())["preference"]
    assert "base_model: dpokit-tiny-llama" in card and "## Training data" in card and "| n_train | " in card
    assert "## Training config" in card and "lora:" in card
    assert f"{evaluation['implicit_reward_accuracy']['value']:.4f}" in card


def test_export_refuses_existing_folder_and_writes_nothing_half(lora_run, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    res = run_cli("export", lora_run, "--out", out)
    assert res.returncode == 2 and "--overwrite" in res.stderr and "Traceback" not in res.stderr
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export.")]
