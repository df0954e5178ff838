"""configs/notebook-gpt2-ultrafeedback.yaml runs offline with the model and dataset swapped for local stand-ins
(dpokit-tiny-gpt2, a fixture in BarraHome/ultrafeedback_binarized's shape), and its settings reach the trainer."""

import json

from conftest import CONFIGS, FIXTURES
from dpokit.core.config import load_config

NOTEBOOK = CONFIGS / "notebook-gpt2-ultrafeedback.yaml"


def offline_config(tmp_path):
    return load_config(NOTEBOOK, [
        "model.name_or_path=dpokit-tiny-gpt2",
        f"data.source={FIXTURES / 'ultrafeedback_train_prefs.jsonl'}",
        f"data.eval_source={FIXTURES / 'ultrafeedback_test_prefs.jsonl'}",
        f"output.dir={tmp_path / 'run'}",
    ])


def test_notebook_config_as_written():
    cfg = load_config(NOTEBOOK)
    assert cfg.model.name_or_path == "gpt2"
    assert cfg.data.source == "BarraHome/ultrafeedback_binarized"
    assert (cfg.data.split, cfg.data.eval_split) == ("train_prefs[:50]", "test_prefs[:50]")
    assert (cfg.data.max_rows, cfg.data.max_eval_rows, cfg.data.max_length) == (50, 50, 512)
    t = cfg.train
    assert (t.beta, t.epochs, t.batch_size, t.learning_rate, t.warmup_steps) == (0.1, 5, 1, 1e-4, 2)
    assert (t.lora.r, t.lora.alpha, t.lora.dropout, t.lora.target_modules) == (4, 8, 0.1, ["c_attn", "c_proj"])


def test_notebook_rows_render_as_prompt_then_last_assistant_message():
    """Chosen/rejected are the last assistant message, appended to the prompt text, closed by EOS (no roles)."""
    from dpokit.core.models import load_tokenizer
    from dpokit.core.templates import render, setup_chat_template
    from dpokit.data import load_preferences

    cfg = load_config(NOTEBOOK, [f"data.source={FIXTURES / 'ultrafeedback_train_prefs.jsonl'}",
                                 f"data.eval_source={FIXTURES / 'ultrafeedback_test_prefs.jsonl'}"])
    data = load_preferences(cfg.data)
    assert (len(data.train), len(data.eval)) == (6, 3)
    raw = json.loads((FIXTURES / "ultrafeedback_train_prefs.jsonl").read_text().splitlines()[0])
    tok = load_tokenizer("dpokit-tiny-gpt2")
    setup_chat_template(tok, cfg.data.chat_template)
    prompt, chosen, rejected = render(data.train[0], tok)
    assert prompt == raw["prompt"]
    assert chosen == raw["chosen"][-1]["content"] + tok.eos_token
    assert rejected == raw["rejected"][-1]["content"] + tok.eos_token


def test_notebook_config_trains_offline_with_its_settings(tmp_path):
    from dpokit.eval import evaluate_run
    from dpokit.train.trainer import run_training

    cfg = offline_config(tmp_path)
    result = run_training(cfg)
    assert result.evaluate
    evaluate_run(result.run_dir, quiet=True)
    run = result.run_dir
    adapter = json.loads((run / "model" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8 and adapter["lora_dropout"] == 0.1
    assert set(adapter["target_modules"]) == {"c_attn", "c_proj"}
    args = json.loads((run / "training_args.json").read_text())  # what reached the Trainer
    assert args["learning_rate"] == 1e-4 and args["num_train_epochs"] == 5 and args["warmup_steps"] == 2
    assert args["per_device_train_batch_size"] == 1 and args["gradient_accumulation_steps"] == 1
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["global_step"] == 5 * 6  # 5 epochs of 6 pairs, one pair per step
    assert summary["reference"] == "adapter"
    saved = (run / "config.yaml").read_text()
    assert "beta: 0.1" in saved and "max_length: 512" in saved
    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["preference"]["n_pairs"] == 3
