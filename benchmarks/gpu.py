"""GPU engine benchmark (issue 13, docs/gpu-engine.md): DPO steps/s of TRL and of each dpokit attention backend on
random-weight models of real shapes, one JSON per shape with a `summary` object.

    python benchmarks/gpu.py                        # both shapes on CUDA, bf16 (about 5 minutes on one H100)
    python benchmarks/gpu.py --shape qwen2-1.5b --steps 12
    python benchmarks/gpu.py --smoke --out-dir /tmp/gpu-smoke   # CPU: tiny shape, 2 steps per arm (tests the script)

Shapes (random weights, nothing downloaded): smollm2-135m (LLaMA: vocab 49152, hidden 576, 30 layers, 9 query and
3 KV heads, tied embeddings) and qwen2-1.5b (vocab 151936, hidden 1536, 28 layers, 12 query and 2 KV heads,
intermediate 8960, tied embeddings). Data: throughput.py's synthetic pairs (prompt median 120 tokens, responses
median 160), the same pairs in the same order for every arm.

Every arm: full fine-tune, fp32 weights with bf16 autocast (Trainer's bf16=True), AdamW, the same pairs per
optimizer step (--pairs-per-step, one micro-batch), the same gradient-checkpointing setting (--grad-ckpt), the
reference model in the step except `dpokit_cached_ref`. Arms:
- trl: trl.DPOTrainer 1.16 with sdpa attention and its default padded batches (the JSON says which settings);
- dpokit_dense: packed pairs with the dense 4-D mask (dpokit's layout before the GPU engine);
- dpokit_varlen, dpokit_flex: the new backends (skipped with the reason where they cannot run);
- dpokit_cached_ref: the best backend that ran, reference log-probs computed once before training (not in the step).

Every arm reads the pairs in order (a sequential sampler: the counted tokens are the step's own) and times steps
from Trainer's on_step_begin to on_step_end (collation happens before, outside the timed step). Per arm: pairs/s
and unique tokens/s over the timed steps, MFU, peak allocated memory raw and minus the allocation at the arm's start
(`peak_above_start_mb`: without the resident fp32 base model every arm shares; `memory_vs_trl` compares these),
median and p90 step time, and the torch.compile graphs built in the arm and during its timed steps (flex compiles
per shape; it gets --flex-warmup extra untimed steps first).
MFU = (6 N + 2 N) x T / t / peak for arms with the reference in the step (policy forward + backward = 6 N T, reference
forward = 2 N T), 6 N T / t / peak for the cached arm; N = parameters without the input embedding (a tied LM head is
counted once, as a matmul), T = unique tokens of the step (prompt once plus both responses), t = the step's seconds,
peak = the GPU's dense bf16 FLOP/s; attention score FLOPs are not counted (they favour no arm: every arm computes
different amounts of them).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # throughput.py's data and tokenizer helpers
import throughput as tp  # noqa: E402
import torch  # noqa: E402

from dpokit.core.attention import flex_unavailable, varlen_unavailable  # noqa: E402
from dpokit.core.packing import (  # noqa: E402
    PackedPairCollator,
    pack_pairs,
    packed_sequence_logps,
    packing_self_check,
    pair_length,
    to_device,
)

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense bf16 FLOP/s (SXM)
ARMS = ("trl", "dpokit_dense", "dpokit_varlen", "dpokit_flex", "dpokit_cached_ref")


def shape_config(shape: str):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(pad_token_id=tp.PAD, eos_token_id=tp.EOS, bos_token_id=None, tie_word_embeddings=True)
    if shape == "smollm2-135m":
        return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                           rope_theta=100000.0, **common)
    if shape == "qwen2-1.5b":
        return Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                           num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                           rope_theta=1000000.0, **common)
    if shape == "tiny":  # --smoke
        return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, **common)
    raise ValueError(shape)


def build_model(shape: str, device: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: no minutes of CPU init for 1.5B parameters
        return AutoModelForCausalLM.from_config(shape_config(shape), attn_implementation="sdpa").float()


def matmul_params(model) -> int:
    """Parameters that take part in matmuls: all but the input embedding (a tied LM head counted once)."""
    embed = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters()) - embed.numel() + (
        embed.numel() if model.get_output_embeddings().weight is embed else 0)


class StepTimer:
    """A TrainerCallback recording each optimizer step's wall time (synchronised on CUDA)."""

    def __init__(self, device: str):
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer.sync()
                timer.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer.sync()
                timer.steps.append(time.perf_counter() - timer.start)
                timer.graphs.append(dynamo_graphs())

        self.device, self.steps, self.graphs, self.start, self.callback = device, [], [], 0.0, _Callback()

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()


def sequential(trainer_cls):
    """`trainer_cls` reading its training set in order: with Trainer's random sampler the counted tokens of a step
    (taken in order from the pairs) would belong to other pairs (about +-10% on tokens/s and MFU)."""
    from torch.utils.data import SequentialSampler

    class Sequential(trainer_cls):
        def _get_train_sampler(self, *args, **kwargs):  # Trainer's private hook (transformers 5.x)
            return SequentialSampler(self.train_dataset)

    Sequential.__name__ = f"Sequential{trainer_cls.__name__}"
    return Sequential


def dynamo_graphs() -> int:
    """Graphs torch.compile has built so far in this process (a recompilation adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def training_args(opts, out_dir: str, trl: bool = False, warmup: int | None = None):
    kwargs = dict(output_dir=out_dir, per_device_train_batch_size=opts.pairs_per_step, learning_rate=1e-6,
                  max_steps=(opts.warmup if warmup is None else warmup) + opts.steps, bf16=opts.device == "cuda", gradient_checkpointing=opts.grad_ckpt,
                  logging_steps=10**6, save_strategy="no", report_to=[], seed=0, data_seed=0,
                  use_cpu=opts.device == "cpu", dataloader_pin_memory=opts.device == "cuda", disable_tqdm=True,
                  logging_nan_inf_filter=False)
    if trl:
        from trl import DPOConfig

        return DPOConfig(**kwargs)
    from transformers import TrainingArguments

    return TrainingArguments(remove_unused_columns=False, **kwargs)


def arm_trl(base, pairs, opts, tmp, timer):
    from datasets import Dataset
    from trl import DPOTrainer as TRLTrainer

    rows = [{"prompt": tp.as_text(p["prompt_ids"]), "chosen": " " + tp.as_text(p["chosen_ids"]),
             "rejected": " " + tp.as_text(p["rejected_ids"])} for p in pairs]
    model, ref = copy.deepcopy(base), copy.deepcopy(base).eval().requires_grad_(False)
    trainer = sequential(TRLTrainer)(model=model, ref_model=ref, args=training_args(opts, tmp, trl=True),
                         train_dataset=Dataset.from_list(rows), processing_class=tp.word_tokenizer(base.config.vocab_size),
                         callbacks=[timer.callback])
    trainer.train()
    return {"settings": "sdpa attention, padded batches (TRL's default collator), bf16 autocast, reference model in "
                        "the step; padding_free and use_liger_kernel off (they need flash-attn / liger-kernel)"}


def arm_dpokit(base, pairs, opts, tmp, timer, attention: str, cached: bool = False, warmup: int | None = None):
    from dpokit.core.config import TrainConfig
    from dpokit.train.trainer import DPOTrainer, disable_dropout

    model = copy.deepcopy(base)
    disable_dropout(model)
    ref = None if cached else copy.deepcopy(base).eval().requires_grad_(False)
    trainer = sequential(DPOTrainer)(model=model, args=training_args(opts, tmp, warmup=warmup), train_dataset=pairs,
                         data_collator=PackedPairCollator(tp.PAD, attention=attention), dpo_cfg=TrainConfig(),
                         ref_model=ref, callbacks=[timer.callback])
    trainer.train()
    return {"attention": attention, "step0_check": trainer.step0_check}


@torch.no_grad()
def cached_reference(base, pairs, opts, attention: str) -> tuple[list[dict], float]:
    start = time.perf_counter()
    out = [dict(p) for p in pairs]
    for s in range(0, len(pairs), opts.pairs_per_step):
        batch = to_device(pack_pairs(pairs[s:s + opts.pairs_per_step], tp.PAD, attention=attention), opts.device)
        with torch.autocast(opts.device, dtype=torch.bfloat16, enabled=opts.device == "cuda"):
            lp = packed_sequence_logps(base.eval(), batch)
        for j, (c, r) in enumerate(zip(lp["chosen"].tolist(), lp["rejected"].tolist())):
            out[s + j]["ref_chosen_logps"], out[s + j]["ref_rejected_logps"] = c, r
    return out, time.perf_counter() - start


def self_checks(base, pairs, opts) -> dict:
    """Each backend's availability and start-up self-check (packed vs padded log-probs), and what auto picks."""
    from dpokit.core.config import TrainConfig
    from dpokit.train.packing import choose_collator

    checks = {}
    autocast = torch.bfloat16 if opts.device == "cuda" else None  # the arms' precision (bf16 autocast on CUDA)
    for attention, unavailable in (("varlen", varlen_unavailable), ("flex", flex_unavailable), ("dense", None)):
        reason = unavailable() if unavailable else None
        if reason is None:
            reason = packing_self_check(base, pairs[0], tp.PAD, attention=attention, autocast=autocast)
        checks[attention] = {"passes": reason is None, "reason": reason}
    collator, _ = choose_collator(TrainConfig(layout="auto"), base, None, pairs[:8], tp.PAD, autocast=autocast)
    checks["auto_picks"] = getattr(collator, "attention", "padded")
    return checks


TIMING_NOTE = ("step times run from Trainer's on_step_begin to on_step_end: the batch is fetched and collated "
               "before on_step_begin, so collation is outside the timed step (the same in every arm)")


def run_shape(shape: str, opts) -> dict:
    base = build_model(shape, opts.device)
    n_pairs = opts.pairs_per_step * (opts.warmup + opts.steps)
    pairs = tp.synthetic_pairs(n_pairs, base.config.vocab_size, seed=0)
    step_tokens = [sum(pair_length(p) for p in pairs[s:s + opts.pairs_per_step])
                   for s in range(0, n_pairs, opts.pairs_per_step)][opts.warmup:]
    n_matmul = matmul_params(base)
    device_name = torch.cuda.get_device_name() if opts.device == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in device_name), None)
    checks = self_checks(base, pairs, opts)
    print(f"{shape}: {n_matmul / 1e6:.0f}M matmul parameters, {opts.pairs_per_step} pairs per step, device "
          f"{device_name}; self-checks {checks}", flush=True)
    result = {"shape": shape, "device_name": device_name, "config": vars(opts), "matmul_params": n_matmul,
              "peak_bf16_flops": peak, "self_checks": checks, "timing_note": TIMING_NOTE, "arms": {}, "skipped": {}}
    best_backend = next((b for b in ("varlen", "flex", "dense") if checks[b]["passes"]), "dense")
    for arm in [a.strip() for a in opts.arms.split(",") if a.strip()]:
        backend = arm.removeprefix("dpokit_")
        if backend in ("varlen", "flex") and not checks[backend]["passes"]:
            result["skipped"][arm] = checks[backend]["reason"]
            print(f"  {arm:20s} skipped: {checks[backend]['reason']}", flush=True)
            continue
        try:
            row = measure_arm(arm, base, pairs, opts, best_backend)
        except Exception as err:  # noqa: BLE001 - one arm failing must not lose the others' numbers
            result["skipped"][arm] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
            print(f"  {arm:20s} {result['skipped'][arm]}", flush=True)
            continue
        seconds = sum(row.pop("timed"))
        flops_per_token = (6 if arm == "dpokit_cached_ref" else 8) * n_matmul
        row = {"pairs_per_s": round(opts.pairs_per_step * row["steps_timed"] / seconds, 3),
               "unique_tokens_per_s": round(sum(step_tokens) / seconds, 1),
               "mfu": round(flops_per_token * sum(step_tokens) / seconds / peak, 4) if peak else None, **row}
        result["arms"][arm] = row
        print(f"  {arm:20s} {row['pairs_per_s']:8.2f} pairs/s {row['unique_tokens_per_s']:10.0f} tok/s  mfu "
              f"{row['mfu']}  peak {row['peak_memory_mb']} MB (above start {row['peak_above_start_mb']} MB)  "
              f"step median {row['step_s_median']} s  graphs in timed steps {row['dynamo_graphs_timed']}", flush=True)
    result["summary"] = summary(result)
    del base
    return result


def measure_arm(arm: str, base, pairs, opts, best_backend: str) -> dict:
    """One arm's timed steps and memory. Memory: the raw peak allocation and the peak minus the allocation at the
    arm's start (the shared fp32 `base` and anything else every arm holds). flex first runs --flex-warmup extra
    untimed steps (its kernels compile per shape; graphs built during the timed steps are counted)."""
    timer = StepTimer(opts.device)
    gc.collect()
    start_mb = 0.0
    if opts.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start_mb = torch.cuda.memory_allocated() / 2**20
    backend = arm.removeprefix("dpokit_")
    warmup = opts.warmup + (opts.flex_warmup if backend == "flex" else 0)
    extra = pairs[:opts.pairs_per_step * (warmup - opts.warmup)] if warmup > opts.warmup else []
    graphs_before, wall = dynamo_graphs(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if arm == "trl":
            info = arm_trl(base, pairs, opts, tmp, timer)
        elif arm == "dpokit_cached_ref":
            cached, seconds = cached_reference(base, pairs, opts, best_backend)
            info = arm_dpokit(base, cached, opts, tmp, timer, best_backend, cached=True)
            info["reference_precompute_s"] = round(seconds, 3)
        else:
            info = arm_dpokit(base, extra + pairs, opts, tmp, timer, backend, warmup=warmup)
    timed = timer.steps[warmup:]
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if opts.device == "cuda" else None
    return {"timed": timed, "steps_timed": len(timed), "warmup_steps": warmup,
            "peak_memory_mb": None if peak_mb is None else round(peak_mb, 1),
            "peak_above_start_mb": None if peak_mb is None else round(peak_mb - start_mb, 1),
            "start_memory_mb": round(start_mb, 1),
            "step_s_median": round(statistics.median(timed), 4),
            "step_s_p90": round(sorted(timed)[min(len(timed) - 1, int(0.9 * len(timed)))], 4),
            "dynamo_graphs_arm": dynamo_graphs() - graphs_before,
            "dynamo_graphs_timed": timer.graphs[-1] - timer.graphs[warmup - 1] if warmup else timer.graphs[-1] - graphs_before,
            "reference_in_step": arm != "dpokit_cached_ref", "wall_s": round(time.perf_counter() - wall, 1), **info}


def summary(result: dict) -> dict:
    arms = result["arms"]
    with_ref = {a: r for a, r in arms.items() if a.startswith("dpokit") and r["reference_in_step"]}
    best = max(with_ref, key=lambda a: with_ref[a]["pairs_per_s"]) if with_ref else None
    trl = arms.get("trl")
    ratio = lambda key: (round(arms[best][key] / trl[key], 3)  # noqa: E731
                         if best and trl and arms[best][key] and trl[key] else None)
    return {"device_name": result["device_name"], "shape": result["shape"], "best_dpokit_arm": best,
            "dpokit_vs_trl": ratio("pairs_per_s"), "mfu": arms[best]["mfu"] if best else None,
            "memory_vs_trl": ratio("peak_above_start_mb"), "raw_peak_memory_vs_trl": ratio("peak_memory_mb")}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="all", choices=["all", "smollm2-135m", "qwen2-1.5b"])
    ap.add_argument("--pairs-per-step", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per arm")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (kernels, compile, allocator)")
    ap.add_argument("--flex-warmup", type=int, default=6,
                    help="extra untimed steps for the flex arm (its kernels compile per shape)")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in every arm")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of: " + ", ".join(ARMS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--smoke", action="store_true", help="tiny shape, 2 steps per arm, no warm-up (tests the script)")
    ap.add_argument("--out-dir", default="benchmarks/results")
    opts = ap.parse_args(argv)
    if opts.smoke:
        opts.shape, opts.steps, opts.warmup, opts.pairs_per_step, opts.flex_warmup = "tiny", 2, 0, 2, 1
    return opts


def main(argv=None) -> list[dict]:
    opts = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    shapes = ["smollm2-135m", "qwen2-1.5b"] if opts.shape == "all" else [opts.shape]
    out_dir = Path(opts.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for shape in shapes:
        result = run_shape(shape, opts)
        tag = "cuda" if opts.device == "cuda" else "cpu"
        path = out_dir / f"gpu_{shape}_{tag}.json"
        path.write_text(json.dumps(result, indent=2, default=str))
        print("summary", json.dumps(result["summary"]), "\nwrote", path, flush=True)
        results.append(result)
        gc.collect()
        if opts.device == "cuda":
            torch.cuda.empty_cache()
    return results


if __name__ == "__main__":
    main()
