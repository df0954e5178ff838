"""Bad input sweep: each case is one line on stderr (what, where, how to fix), exit code 2, no traceback, and
nothing written (no run folder; an existing one untouched)."""

import json

import pytest
import yaml

from conftest import run_cli, run_main, tiny_config

GOOD_ROW = {"prompt": "How was the sea?", "chosen": " Lovely.", "rejected": " Ugly."}


def _write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(tmp_path, **sections):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, **sections)))
    return path


def _assert_user_error(res, *needles):
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr[-3000:]
    line = lines[0]
    assert line.startswith("error: ")
    assert ";" in line  # the part after the semicolon says how to fix it
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def _case_malformed_yaml(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("data:\n  source: [unclosed\ntrain:\n  beta: 0.1\n")
    return path, ["malformed YAML", "line"]


def _case_unknown_key(tmp_path):
    return _config(tmp_path, train={"bta": 0.1}), ["cfg.yaml", "train.bta", "unknown key", "did you mean train.beta?"]


def _case_wrong_type(tmp_path):
    return _config(tmp_path, train={"batch_size": "many"}), ["train.batch_size", "'many'"]


def _case_missing_file(tmp_path):
    return _config(tmp_path, data={"source": str(tmp_path / "missing.jsonl")}), ["data.source", "missing.jsonl", "not found"]


def _case_empty_dataset(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    return _config(tmp_path, data={"source": str(tmp_path / "empty.jsonl")}), ["empty.jsonl", "no rows"]


def _case_every_row_dropped(tmp_path):
    rows = [{"prompt": f"Q{i}?", "chosen": " Same.", "rejected": " Same."} for i in range(6)]
    src = _write_rows(tmp_path / "same.jsonl", rows)
    return _config(tmp_path, data={"source": str(src)}), ["same.jsonl", "every row was dropped", "6 with chosen == rejected"]


def _case_non_utf8(tmp_path):
    src = tmp_path / "latin1.jsonl"
    src.write_bytes(json.dumps(GOOD_ROW).encode() + b"\n" + '{"prompt": "Caf\u00e9?", "chosen": " a", "rejected": " b"}\n'.encode("latin-1"))
    return _config(tmp_path, data={"source": str(src)}), ["latin1.jsonl:2", "not UTF-8", "UTF-8"]


def _case_too_long_with_truncation_error(tmp_path):
    rows = [GOOD_ROW] * 5 + [{"prompt": "Tell me everything. " * 40, "chosen": " Fine.", "rejected": " Bad."}]
    src = _write_rows(tmp_path / "long.jsonl", rows)
    cfg = _config(tmp_path, data={"source": str(src), "truncation": "error", "max_length": 32, "eval_fraction": 0.0})
    return cfg, ["long.jsonl:6", "data.max_length=32", "data.truncation"]


def _case_no_chat_template(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"Question {i}?"}],
             "chosen": [{"role": "assistant", "content": "Nice."}],
             "rejected": [{"role": "assistant", "content": "Bad."}]} for i in range(6)]
    src = _write_rows(tmp_path / "chat.jsonl", rows)
    cfg = _config(tmp_path, model={"name_or_path": "dpokit-tiny-gpt2"}, data={"source": str(src)})
    return cfg, ["chat template", "dpokit-tiny-gpt2", "data.chat_template"]


# --- Cases checked by the training plan: all fail before any weights load or file is written -------------------
# A case returns (config, needles) or (config, needles, extra CLI args) or (config, needles, extra args, absent):
# `absent` are strings that must NOT appear on stderr (secrets).

def _case_judge_typo(tmp_path):
    return _config(tmp_path, eval={"judge": "sentimnt"}), ["eval.judge", "sentimnt", "sentiment", "did you mean"]


def _case_python_judge_file_missing(tmp_path):
    spec = f"{tmp_path / 'no_judge.py'}:score"
    cfg = _config(tmp_path, eval={"judge": "python", "judge_options": {"function": spec}})
    return cfg, ["eval.judge_options.function", "no_judge.py", "not found"]


def _case_python_judge_function_missing(tmp_path):
    (tmp_path / "my_judge.py").write_text("def other(prompt, response):\n    return 1.0\n")
    spec = f"{tmp_path / 'my_judge.py'}:score"
    cfg = _config(tmp_path, eval={"judge": "python", "judge_options": {"function": spec}})
    return cfg, ["eval.judge_options.function", "my_judge.py", "no function 'score'"]


def _case_reward_model_folder_missing(tmp_path):
    cfg = _config(tmp_path, eval={"judge": "reward-model", "judge_options": {"model": str(tmp_path / "no-rm")}})
    return cfg, ["eval.judge_options.model", "no-rm", "not found"]


def _case_llm_judge_without_model(tmp_path):
    return _config(tmp_path, eval={"judge": "llm"}), ["eval.judge_options.model", "llm judge needs a model"]


def _case_llm_judge_api_key_as_env_name(tmp_path):
    secret = "sk-proj-Zx81QpLmN0rStUvWx"
    cfg = _config(tmp_path, eval={"judge": "llm", "judge_options": {
        "model": "m", "base_url": "http://127.0.0.1:9/v1", "api_key_env": secret}})
    return cfg, ["eval.judge_options.api_key_env", "looks like an API key"], [], [secret, secret[:10]]


def _case_unknown_judge_option(tmp_path):
    cfg = _config(tmp_path, eval={"judge_options": {"temperature": 0.5}})
    return cfg, ["eval.judge_options", "temperature", "sentiment", "tie_margin"]


def _case_set_without_equals(tmp_path):
    return _config(tmp_path), ["--set 'trainbeta'", "section.key=value"], ["--set", "trainbeta"]


def _case_set_key_typo(tmp_path):
    """A typo in --set is named as the --set the user typed (not blamed on the YAML file), with "did you mean"."""
    return _config(tmp_path), ["--set train.bta=0.2", "unknown key", "did you mean train.beta?"], \
        ["--set", "train.bta=0.2"], ["cfg.yaml"]


def _case_set_with_space_instead_of_equals(tmp_path):
    """`--set train.beta 0.2`: without the check, click's "Got unexpected extra argument (0.2)"."""
    return _config(tmp_path), ["--set 'train.beta'", "train.beta=0.2", "space"], ["--set", "train.beta", "0.2"], \
        ["unexpected extra argument"]


def _case_set_without_section(tmp_path):
    return _config(tmp_path), ["--set 'beta=0.1'", "section", "train.beta=0.1"], ["--set", "beta=0.1"]


def _case_unknown_loss(tmp_path):
    return _config(tmp_path, train={"loss": "sigmod"}), ["train.loss", "'sigmod'", "sigmoid"]


def _case_loss_needs_reference(tmp_path):
    return _config(tmp_path, train={"reference": "none"}), ["train.reference", "none", "needs a reference", "simpo"]


def _case_adapter_reference_without_lora(tmp_path):
    return _config(tmp_path, train={"reference": "adapter"}), ["train.reference", "adapter", "train.lora"]


def _needs_cpu_only():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: bf16 is allowed here")


def _case_bf16_on_cpu(tmp_path):
    _needs_cpu_only()
    return _config(tmp_path, train={"precision": "bf16"}), ["train.precision", "bf16", "needs a GPU", "fp32"]


def _case_trl_unsupported_loss(tmp_path):
    # `dpokit losses`: simpo is native-only (simpo's registry record has no trl_name).
    cfg = _config(tmp_path, train={"engine": "trl", "loss": "simpo"})
    return cfg, ["train.engine", "trl", "simpo", "engine: native"]


def _case_trl_label_smoothing(tmp_path):
    cfg = _config(tmp_path, train={"engine": "trl", "loss": "sigmoid", "label_smoothing": 0.1})
    return cfg, ["train.label_smoothing", "engine: native"]


def _case_loss_typo_did_you_mean(tmp_path):
    return _config(tmp_path, train={"loss": "sigmoid:1.0,apo_zer:0.5"}), ["train.loss", "'apo_zer'",
                                                                          "did you mean 'apo_zero'?"]


def _case_ld_alpha_outside_0_1(tmp_path):
    return _config(tmp_path, train={"ld_alpha": 1.5}), ["train.ld_alpha", "1.5", "less than or equal to 1"]


def _case_negative_discopop_tau(tmp_path):
    return _config(tmp_path, train={"loss": "discopop", "discopop_tau": -0.05}), ["train.discopop_tau", "-0.05",
                                                                                "greater than 0"]


def _case_alpha_divergence_without_f_alpha(tmp_path):
    return _config(tmp_path, train={"f_divergence": "alpha_divergence"}), ["train.f_alpha", "alpha_divergence",
                                                                          "set train.f_alpha"]


def _case_f_divergence_with_reference_free_loss(tmp_path):
    return _config(tmp_path, train={"loss": "simpo", "reference": "none", "f_divergence": "js_divergence"}), [
        "train.f_divergence", "js_divergence", "simpo", "reverse_kl"]


def _case_f_divergence_with_nca(tmp_path):
    return _config(tmp_path, train={"loss": "nca_pair", "f_divergence": "forward_kl"}), [
        "train.f_divergence", "nca_pair", "reverse_kl"]


def _case_exo_pair_without_label_smoothing(tmp_path):
    return _config(tmp_path, train={"loss": "exo_pair"}), ["train.label_smoothing", "exo_pair", "0.001"]


def _case_ld_alpha_with_precomputed_reference(tmp_path):
    return _config(tmp_path, train={"ld_alpha": 0.5, "reference": "precomputed"}), [
        "train.ld_alpha", "precomputed", "reference: model"]


def _case_weighting_with_aot(tmp_path):
    return _config(tmp_path, train={"loss": "aot", "use_weighting": True}), ["train.use_weighting", "aot"]


def _case_trl_weighting_with_sft(tmp_path):
    cfg = _config(tmp_path, train={"engine": "trl", "loss": "sigmoid:1.0,sft:0.5", "use_weighting": True})
    return cfg, ["train.use_weighting", "sft", "engine: native"]


def _case_sync_reference_with_precomputed(tmp_path):
    return _config(tmp_path, train={"reference": "precomputed", "sync_reference": {"alpha": 0.5, "steps": 2}}), [
        "train.sync_reference", "precomputed", "reference: model"]


def _case_sync_reference_with_lora(tmp_path):
    return _config(tmp_path, train={"lora": {"r": 4}, "sync_reference": {"alpha": 0.5, "steps": 2}}), [
        "train.sync_reference", "LoRA", "disabled adapter"]


def _case_sync_reference_alpha_above_1(tmp_path):
    return _config(tmp_path, train={"sync_reference": {"alpha": 1.5}}), ["train.sync_reference.alpha", "1.5",
                                                                         "less than or equal to 1"]


def _case_missing_relative_source(tmp_path):
    return _config(tmp_path, data={"source": "./no-such-data.jsonl"}), ["data.source", "no-such-data.jsonl", "not found"]


def _case_model_folder_missing(tmp_path):
    cfg = _config(tmp_path, model={"name_or_path": "./no-such-model"})
    return cfg, ["model.name_or_path", "./no-such-model", "not found"]


def _case_output_dir_not_empty(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("mine")
    return _config(tmp_path), ["output.dir", str(run), "not empty", "--overwrite"]


def _case_resume_without_checkpoints(tmp_path):
    return _config(tmp_path), ["--resume", "no checkpoints"], ["--resume"]


def _case_resume_empty_run_folder(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    return _config(tmp_path), ["--resume", "no checkpoints"], ["--resume"]


def _case_two_problems_at_once(tmp_path):
    cfg = _config(tmp_path, eval={"judge": "sentimnt"}, train={"loss": "sigmod"})
    return cfg, ["eval.judge", "sentimnt", "train.loss", "sigmod"]


def _case_many_plan_problems_at_once(tmp_path):
    _needs_cpu_only()
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("mine")
    cfg = _config(tmp_path, eval={"judge": "reward-model"}, train={"loss": "simpo", "engine": "trl",
                                                                 "precision": "bf16"})
    return cfg, ["eval.judge_options.model", "train.engine", "simpo", "train.precision", "output.dir"]


def _case_path_and_plan_problems_at_once(tmp_path):
    """A missing model folder (a path check) and a loss typo (a plan check): both in the one line."""
    cfg = _config(tmp_path, model={"name_or_path": "./no-such-model"}, train={"loss": "sigmod"})
    return cfg, ["model.name_or_path", "./no-such-model", "train.loss", "sigmod"]


CASES = {
    "malformed_yaml": _case_malformed_yaml,
    "unknown_key": _case_unknown_key,
    "wrong_type": _case_wrong_type,
    "missing_file": _case_missing_file,
    "empty_dataset": _case_empty_dataset,
    "every_row_dropped": _case_every_row_dropped,
    "non_utf8": _case_non_utf8,
    "too_long_truncation_error": _case_too_long_with_truncation_error,
    "no_chat_template": _case_no_chat_template,
    # checked by the plan, before any weights load
    "judge_typo": _case_judge_typo,
    "python_judge_file_missing": _case_python_judge_file_missing,
    "python_judge_function_missing": _case_python_judge_function_missing,
    "reward_model_folder_missing": _case_reward_model_folder_missing,
    "llm_judge_without_model": _case_llm_judge_without_model,
    "llm_judge_api_key_as_env_name": _case_llm_judge_api_key_as_env_name,
    "unknown_judge_option": _case_unknown_judge_option,
    "set_without_equals": _case_set_without_equals,
    "set_without_section": _case_set_without_section,
    "set_key_typo": _case_set_key_typo,
    "set_with_space_instead_of_equals": _case_set_with_space_instead_of_equals,
    "unknown_loss": _case_unknown_loss,
    "loss_needs_reference": _case_loss_needs_reference,
    "adapter_reference_without_lora": _case_adapter_reference_without_lora,
    "bf16_on_cpu": _case_bf16_on_cpu,
    "trl_unsupported_loss": _case_trl_unsupported_loss,
    "trl_label_smoothing": _case_trl_label_smoothing,
    "loss_typo_did_you_mean": _case_loss_typo_did_you_mean,
    "ld_alpha_outside_0_1": _case_ld_alpha_outside_0_1,
    "negative_discopop_tau": _case_negative_discopop_tau,
    "alpha_divergence_without_f_alpha": _case_alpha_divergence_without_f_alpha,
    "f_divergence_with_reference_free_loss": _case_f_divergence_with_reference_free_loss,
    "f_divergence_with_nca": _case_f_divergence_with_nca,
    "exo_pair_without_label_smoothing": _case_exo_pair_without_label_smoothing,
    "ld_alpha_with_precomputed_reference": _case_ld_alpha_with_precomputed_reference,
    "weighting_with_aot": _case_weighting_with_aot,
    "trl_weighting_with_sft": _case_trl_weighting_with_sft,
    "sync_reference_with_precomputed": _case_sync_reference_with_precomputed,
    "sync_reference_with_lora": _case_sync_reference_with_lora,
    "sync_reference_alpha_above_1": _case_sync_reference_alpha_above_1,
    "missing_relative_source": _case_missing_relative_source,
    "model_folder_missing": _case_model_folder_missing,
    "output_dir_not_empty": _case_output_dir_not_empty,
    "resume_without_checkpoints": _case_resume_without_checkpoints,
    "resume_empty_run_folder": _case_resume_empty_run_folder,
    "two_problems_at_once": _case_two_problems_at_once,
    "many_plan_problems_at_once": _case_many_plan_problems_at_once,
    "path_and_plan_problems_at_once": _case_path_and_plan_problems_at_once,
}


def _snapshot(root):
    """Every file and folder under root, with file contents: what 'nothing written, nothing touched' compares."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _check_case(tmp_path, case, run):
    config, needles, *rest = CASES[case](tmp_path)
    extra_args = rest[0] if rest else []
    absent = rest[1] if len(rest) > 1 else []
    had_run = (tmp_path / "run").exists()
    before = _snapshot(tmp_path)
    res = run("train", config, *extra_args)
    _assert_user_error(res, *needles)
    for secret in absent:
        assert secret not in res.stderr and secret not in res.stdout
    # Failed before training: no run folder (an existing one untouched) and no file created or changed anywhere.
    assert (tmp_path / "run").exists() == had_run
    assert _snapshot(tmp_path) == before
    return config


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, case, capfd):
    _check_case(tmp_path, case, lambda *args: run_main(capfd, *args))


@pytest.mark.parametrize("case", ["malformed_yaml", "empty_dataset", "judge_typo", "python_judge_file_missing"])
def test_bad_input_in_a_real_process(tmp_path, case):
    """The same contract through the installed entry point in a fresh interpreter, bytecode writing on."""
    config = _check_case(tmp_path, case, lambda *args: run_cli(*args, env={"PYTHONDONTWRITEBYTECODE": ""}))
    if case == "empty_dataset":  # --debug shows where it came from instead
        assert "Traceback" in run_cli("--debug", "train", config).stderr


def test_existing_output_folder_is_refused_and_untouched(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("mine")
    res = run_cli("train", _config(tmp_path))
    _assert_user_error(res, str(run), "--overwrite")
    assert [p.name for p in run.iterdir()] == ["keep.txt"]


def test_overwrite_deletes_nothing_when_validation_fails(tmp_path):
    """--overwrite replaces the run folder only after the data and model validated."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("mine")
    (tmp_path / "empty.jsonl").write_text("")
    res = run_cli("train", _config(tmp_path, data={"source": str(tmp_path / "empty.jsonl")}), "--overwrite")
    _assert_user_error(res, "no rows")
    assert [p.name for p in run.iterdir()] == ["keep.txt"]


def test_tokenizer_without_pad_token_trains_with_eos_as_pad(tmp_path):
    cfg = _config(tmp_path, model={"name_or_path": "dpokit-tiny-gpt2"}, train={"max_steps": 2},
                  eval={"enabled": False})
    res = run_cli("train", cfg)
    assert res.returncode == 0, res.stderr[-3000:]
    tok = json.loads((tmp_path / "run" / "model" / "tokenizer_config.json").read_text())
    assert tok["pad_token"] == tok["eos_token"] == "<|endoftext|>"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss"] for r in rows if "loss" in r)  # finite, not NaN


def test_tokenizer_without_pad_or_eos_is_a_clear_error(tmp_path):
    from dpokit.core.errors import UserError
    from dpokit.core.models import build_tiny_tokenizer, load_tokenizer

    tok = build_tiny_tokenizer("gpt2")
    tok.eos_token = None
    tok.bos_token = None
    tok.unk_token = None
    tok.save_pretrained(tmp_path / "tok")
    with pytest.raises(UserError, match="neither a pad nor an EOS token"):
        load_tokenizer(str(tmp_path / "tok"))


def test_data_inspect_names_its_own_flag_not_the_config_key(tmp_path, capfd):
    """`dpokit data inspect` takes --chat-template; its error must not send the user to data.chat_template."""
    rows = [{"prompt": [{"role": "user", "content": f"Question {i}?"}],
             "chosen": [{"role": "assistant", "content": "Nice."}],
             "rejected": [{"role": "assistant", "content": "Bad."}]} for i in range(3)]
    src = _write_rows(tmp_path / "chat.jsonl", rows)
    res = run_main(capfd, "data", "inspect", src, "--model", "dpokit-tiny-gpt2")
    line = _assert_user_error(res, "chat template", "--chat-template")
    assert "data.chat_template" not in line


@pytest.mark.parametrize("case", ["loss_typo_did_you_mean", "ld_alpha_outside_0_1", "negative_discopop_tau",
                                  "alpha_divergence_without_f_alpha", "f_divergence_with_reference_free_loss",
                                  "sync_reference_with_precomputed"])
def test_loss_option_errors_from_dpokit_plan_in_a_real_process(tmp_path, case):
    """The loss options' bad inputs (issue 27) end `dpokit plan` too, in a fresh interpreter: exit 2, one line."""
    config, needles, *_ = CASES[case](tmp_path)
    _assert_user_error(run_cli("plan", config), *needles)
