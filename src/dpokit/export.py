"""`dpokit export RUN_DIR --out DIR [--merge]`: a trained run as a plain Hugging Face model folder.

The folder holds safetensors weights, the tokenizer (with the chat template used in training), a generation config
and a model card (README.md: base model, data summary, training config, evaluation results). It is built in a
temporary sibling folder and renamed into place, so a failed export leaves nothing half-written.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml
from huggingface_hub import HfApi
from peft import PeftModel
from transformers import AutoTokenizer, GenerationConfig

from dpokit.core.errors import UserError
from dpokit.core.io import chmod_tree_as_created, make_temp_dir
from dpokit.core.models import load_model, load_model_and_tokenizer, portable_model_name, quiet_hf
from dpokit.core.quant import describe, is_quantized
from dpokit.core.run import RunDir


def _check_out(out: Path, run_dir: Path, overwrite: bool) -> None:
    if out.resolve() == run_dir.resolve() or run_dir.resolve() in out.resolve().parents:
        raise UserError(f"--out: {out} is inside the run folder {run_dir}; export to a folder outside it")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} exists and is a file; choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out: {out} already exists and is not empty; pass --overwrite or choose another --out")


def load_export_model(run: RunDir, cfg, merge: bool):
    """(model, tokenizer, kind): kind is 'full', 'merged' (LoRA folded into the base) or 'adapter'."""
    model_dir = run.model_dir
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=cfg.model.trust_remote_code)
    if run.is_adapter():
        # A quantized run's adapter goes onto the unquantized base, in the precision the run computed in: the
        # adapter is the same either way, and a merge must not round the update into 4/8-bit weights.
        base_cfg = cfg.model
        if cfg.model.quantization != "none":
            base_cfg = cfg.model.model_copy(update={"dtype": training_dtype(run)})
        base, _ = load_model_and_tokenizer(base_cfg, tokenizer=tokenizer, quantize=False)
        model = PeftModel.from_pretrained(base, str(model_dir))
        if merge:
            return merge_adapter(model), tokenizer, "merged"
        return model, tokenizer, "adapter"
    model = load_model(str(model_dir), dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
    return model, tokenizer, "full"


def training_dtype(run: RunDir) -> str:
    """The dtype the run's layers computed in (train_summary's precision), as a model.dtype value."""
    summary = run.read_train_summary()
    precision = summary.precision if summary and summary.precision else "fp32"
    return {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")


def merge_adapter(model):
    """LoRA folded into its base: refused on a quantized base, whose weights would be re-quantized with the
    update added, rounding most of what training learned away (the adapter alone keeps it exactly)."""
    if is_quantized(model):
        raise UserError("--merge: the base is quantized (bitsandbytes); merging would re-quantize the weights and "
                        "round the LoRA update away; export the adapter alone, or merge onto the unquantized base "
                        "(dpokit export --merge loads it for quantized runs)")
    return model.merge_and_unload()


def generation_config_for(model, tokenizer):
    """The model's generation config with the tokenizer's special tokens filled in (greedy unless told)."""
    gen = getattr(model, "generation_config", None)
    gen = GenerationConfig.from_dict(gen.to_dict()) if gen is not None else GenerationConfig()
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(gen, attr, None) is None and getattr(tokenizer, attr, None) is not None:
            setattr(gen, attr, getattr(tokenizer, attr))
    return gen


def portable_value(value):
    """A config or report value with this machine's paths reduced to file names: the model card is published with
    --push-to-hub, and an absolute path says nothing to a reader elsewhere (and may say too much)."""
    if isinstance(value, dict):
        return {k: portable_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable_value(v) for v in value]
    if isinstance(value, str) and value and (os.path.isabs(os.path.expanduser(value)) or os.path.exists(value)):
        return Path(value).name
    return value


def model_card(run: RunDir, cfg, kind: str) -> str:
    """README.md for the exported folder, from the run's own artifacts."""
    data_report = run.read_data_report()
    report = data_report.model_dump() if data_report else {}
    result = run.read_eval()
    evaluation = result.model_dump(mode="python") if result else None
    base, base_note = portable_model_name(cfg.model.name_or_path)
    report = portable_value(report)
    lines = ["---", yaml.safe_dump({"base_model": base, "library_name": "peft" if kind == "adapter" else "transformers",
                                    "tags": ["dpo", "dpokit", "preference-optimization"]}, sort_keys=False).strip(),
             "---", "", f"# DPO fine-tune of {base}", "",
             f"Trained with dpokit using Direct Preference Optimization (loss "
             f"`{cfg.train.loss}`, beta {cfg.train.beta}, {'LoRA' if cfg.train.lora else 'full fine-tune'}).", "",
             "## Base model", "", f"`{base}`" + (f" (revision `{cfg.model.revision}`)" if cfg.model.revision else "")
             + (f": {base_note}" if base_note else ""), ""]
    if kind == "adapter":
        lines += ["This folder is a LoRA adapter: load it with `peft` on top of the base model.", ""]
    elif kind == "merged":
        lines += ["The LoRA adapter is merged into the base weights: a standalone model.", ""]
    if cfg.model.quantization != "none":
        lines += [f"Trained on a quantized base (QLoRA): {describe(cfg.model)}. "
                  + ("This model is the adapter merged onto the **unquantized** base weights in "
                     f"{training_dtype(run)}, not the quantized weights the adapter was trained and evaluated on; "
                     "its scores can differ slightly from the evaluation below." if kind == "merged" else
                     "The adapter loads onto the unquantized base (as in Usage), or onto the base quantized the same "
                     "way (transformers' BitsAndBytesConfig) to reproduce the evaluated model exactly."), ""]
    lines += ["## Training data", "", "| field | value |", "|---|---|"]
    for key in ("source", "format", "n_train", "n_eval"):
        if key in report:
            lines.append(f"| {key} | {report[key]} |")
    counts = report.get("train_counts")
    if counts:
        lines.append(f"| rows in / kept | {counts.get('rows_in')} / {counts.get('rows_out')} |")
    lines += ["", "## Training config", "", "```yaml",
              yaml.safe_dump(portable_value(cfg.model_dump(mode="json")), sort_keys=False).rstrip(), "```", "", "## Evaluation", ""]
    if evaluation:
        pref = evaluation["preference"]
        lines += [f"Held-out preference pairs: {pref.get('n_pairs')}", "", "| metric | value | 95% CI |", "|---|---|---|"]
        rows = [("implicit-reward accuracy", pref.get("implicit_reward_accuracy")),
                ("reward margin", pref.get("reward_margin"))]
        for who in ("base", "tuned"):
            lik = (pref.get("likelihood_accuracy") or {}).get(who) or {}
            rows.append((f"likelihood accuracy, {who} (sum)", lik.get("sum")))
        for name, metric in rows:
            if metric:
                low, high = metric["ci"]
                lines.append(f"| {name} | {metric['value']:.4f} | [{low:.4f}, {high:.4f}] |")
    else:
        lines.append("Not evaluated (run `dpokit eval RUN_DIR` before exporting to include results).")
    usage_load = ("from peft import AutoPeftModelForCausalLM\nmodel = AutoPeftModelForCausalLM.from_pretrained(PATH)"
                  if kind == "adapter" else
                  "from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(PATH)")
    lines += ["", "## Usage", "", "```python", "from transformers import AutoTokenizer", usage_load,
              "tokenizer = AutoTokenizer.from_pretrained(PATH)", "```", ""]
    return "\n".join(lines)


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, merge: bool = False, overwrite: bool = False,
               push_to_hub: str | None = None) -> Path:
    """Write the run's model as a standalone HF folder at `out`; optionally upload it to a hub repo."""
    run, out = RunDir(run_dir), Path(out)
    run.require_model()
    cfg = run.read_config()
    _check_out(out, run.path, overwrite)
    model, tokenizer, kind = load_export_model(run, cfg, merge)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out)
    if kind == "adapter":  # peft records the path the base was loaded from: a folder of this machine's cache
        for adapter in model.peft_config.values():
            adapter.base_model_name_or_path = portable_model_name(cfg.model.name_or_path)[0]
    try:
        with quiet_hf(logs=False):  # no "Writing model shards" bar
            model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if kind != "adapter":
            generation_config_for(model, tokenizer).save_pretrained(str(tmp))
        (tmp / "README.md").write_text(model_card(run, cfg, kind), encoding="utf-8")
        for stray in tmp.glob("*.bin"):  # safetensors only (no pickled training args or weights)
            stray.unlink()
        chmod_tree_as_created(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if push_to_hub:
        push_folder(out, push_to_hub)
    return out


def push_folder(folder: Path, repo_id: str) -> None:
    """Upload to the hub; the token comes from the environment (HF_TOKEN) or `huggingface-cli login`."""
    try:
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True, private=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload DPO model from dpokit")
    except Exception as err:  # auth, network, permissions: all user-facing
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"--push-to-hub {repo_id}: upload failed ({first}); set HF_TOKEN to a token with write "
                        "access and check the repo name (user/name)") from None
