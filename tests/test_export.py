"""`dpokit export`: a LoRA run merged into a plain transformers folder generates exactly what the adapter model
generates (greedy), and carries a model card with base model, data, config and evaluation. Exports are portable
(no path of this machine inside) and, like the run folder, readable under the user's umask."""

import json
import os
import shutil
import stat
import subprocess
import sys

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
    old_umask = os.umask(0o022)  # a typical user's umask: the run folder must come out world-readable
    try:
        result = run_training(config_from_dict(cfg))
        evaluate_run(result.run_dir, quiet=True)  # training no longer evaluates: the caller chains it
    finally:
        os.umask(old_umask)
    return tmp / "run"


def _modes(root):
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_run_folder_follows_the_umask(lora_run):
    modes = _modes(lora_run)
    assert "config.yaml" in modes and "eval.json" in modes and "model/adapter_config.json" in modes
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != (0o755 if (lora_run / name).is_dir() or name == "." else 0o644)}
    assert not wrong, f"modes other than 0644/0755 under umask 022: {wrong}"


@pytest.mark.slow
def test_adapter_export_is_portable_and_loads_from_another_folder_without_the_dpokit_cache(lora_run, tmp_path):
    out = tmp_path / "export"
    res = subprocess.run([sys.executable, "-c", "import os, sys; os.umask(0o022); from dpokit.cli import main; "
                          "sys.argv = ['dpokit', *sys.argv[1:]]; main()", "export", str(lora_run), "--out", str(out)],
                         capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    wrong = {name: oct(mode) for name, mode in _modes(out).items() if mode not in (0o644, 0o755)}
    assert not wrong, wrong

    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "dpokit-tiny-llama"
    for name in ("adapter_config.json", "README.md", "tokenizer_config.json"):
        text = (out / name).read_text()
        assert str(tmp_path.parent) not in text and os.environ["DPOKIT_CACHE"] not in text, name
    card = (out / "README.md").read_text()
    assert "| source | tiny_prefs.jsonl |" in card and "source: tiny_prefs.jsonl" in card, card

    # Move the export and a copy of the base away; load both with plain transformers + peft, the dpokit cache
    # pointing at an empty folder.
    moved, base_copy = tmp_path / "elsewhere" / "adapter", tmp_path / "elsewhere" / "base"
    shutil.move(str(out), moved)
    shutil.copytree(os.path.join(os.environ["DPOKIT_CACHE"], "models", "dpokit-tiny-llama"), base_copy)
    code = ("import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer; "
            "from peft import PeftModel; base = AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
            "model = PeftModel.from_pretrained(base, sys.argv[2]).eval(); tok = AutoTokenizer.from_pretrained(sys.argv[2]); "
            "ids = tok('How was the sea?', return_tensors='pt'); "
            "print(model.generate(**ids, max_new_tokens=8, do_sample=False)[0].tolist())")
    env = dict(os.environ, DPOKIT_CACHE=str(tmp_path / "empty-cache"), HF_HUB_OFFLINE="1")
    loaded = subprocess.run([sys.executable, "-c", code, str(base_copy), str(moved)], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert not (tmp_path / "empty-cache").exists()  # dpokit was not involved


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
