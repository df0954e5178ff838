"""Vision-language DPO throughput on the CPU (issue 29): dpokit's DPOTrainer (each pair laid out once, its images
encoded once) against trl.DPOTrainer with its DataCollatorForVisionPreference (chosen and rejected as two rows, every
image encoded twice), one process per arm, the same pairs and the same weights.

    python benchmarks/vlm_throughput.py                                   # ~30M LLaVA-style, 256 image tokens
    python benchmarks/vlm_throughput.py --image-tokens 576 --out benchmarks/results/vlm_576.json
    python benchmarks/vlm_throughput.py --size tiny --image-tokens 16 --answer-tokens 8 --batch-size 2 \
        --warmup-steps 1 --steps 1                                        # seconds: what the test runs

Model: the `dpokit-tiny-vlm` family (LLaVA: CLIP vision tower, 2-layer projector, LLaMA decoder, the tiny BPE
tokenizer and ChatML) scaled to ~30M parameters, built from transformers configs with random weights (seed 0) and
saved to a temporary folder that both arms load. The CLIP tower's image size is 16 x sqrt(--image-tokens) with 16-px
patches, so every image gives --image-tokens `<image>` tokens (256: 256 px, 576: 384 px).

Pairs: one synthetic image per prompt (coloured rectangles and ellipses on a noisy background, seeded), a short
question, and two assistant answers of exactly --answer-tokens tokens each (as both sides tokenize them: the
template's end-of-turn tokens included). Every pair has the same lengths, so each step costs the same whatever order
the samplers draw.

Identical on both sides: fp32 weights, full fine-tuning (no LoRA), the vision tower frozen (train.freeze_vision:
true, dpokit's default; `requires_grad_(False)` on the tower in both arms; the projector and decoder train), a
separate frozen reference model (a second load of the same weights) on both sides, sigmoid loss with beta 0.1, the Trainer's
default optimizer (AdamW) at --lr, --batch-size pairs per step, no gradient checkpointing (TRL's DPOConfig turns it
on by default; it is turned off here as for dpokit), dropout off, sdpa attention, the machine's default torch
threads.

dpokit's arm is set up as `dpokit train` sets up a vision run: its pairs packed once per pair
(VisionPairCollator) and its reference reusing the policy's image encodes of the same batch (the tower is frozen
and equal in both models: `dpokit.core.vision.share_frozen_tower`), so each image goes through a tower once per
step; TRL's goes through four times (two rows, two models).

Timing: each arm runs in its own fresh Python process (--rounds rounds, the arm order alternating) and trains
--warmup-steps untimed steps, then --steps timed steps. A step is timed from the end of the previous step to the end
of this one, so it includes fetching and collating its batch: for TRL that is its collator running the image
processor on the step's images (TRL's design); dpokit encodes every pair once before training (its design; done in
the arm, timed separately as `encode_s`, and shown in `pairs_per_s_with_encode`, the rate if that one-time encode
were charged to the timed steps). pairs/s = batch size / median step seconds over all timed steps of all rounds.

On a shared machine other processes' load only adds time: each run records the 1-minute load average before and
after it, and `pairs_per_s_fastest_step` (batch size / fastest timed step) is the rate least disturbed by it; the
headline is the median.

Memory: peak RSS growth of the arm's process over everything after its imports (data preparation, both model loads,
trainer set-up, every step), sampled every 5 ms after malloc_trim; the largest over rounds.

Prints a table and writes JSON (--out) with both arms, the ratios dpokit / TRL, the CPU, the versions and settings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this tree's dpokit, installed or not
sys.path.insert(0, str(Path(__file__).resolve().parent))  # throughput.py: the peak-memory sampler

import numpy as np  # noqa: E402
import torch  # noqa: E402
from throughput import PeakMemory  # noqa: E402  (peak RSS growth sampled every 5 ms after malloc_trim)

ARMS = ("dpokit", "trl")
TARGET = {"pairs_per_s_ratio_min": 1.7, "peak_memory_ratio_max": 0.7}

# Model shapes. "30m": ~30M parameters at 256 image tokens (the CLIP position table grows a little with 576).
SIZES = {
    "30m": dict(vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4),
                text=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                          num_key_value_heads=4)),
    "tiny": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
                 text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2)),
}
PATCH = 16
QUESTIONS = ["What shapes are in the picture?", "Describe the image in one sentence.",
             "Which colour covers the most area?", "How many objects do you see, and where are they?"]


# ---------------------------------------------------------------------------------------------------------- model
def image_side(image_tokens: int) -> int:
    side = math.isqrt(image_tokens)
    if side * side != image_tokens:
        raise SystemExit(f"--image-tokens must be a square number (16 x 16 px patches on a square image), not "
                         f"{image_tokens}")
    return side * PATCH


def build_model(size: str, image_tokens: int, out: Path) -> int:
    """The tiny-vlm family (LLaVA) at `size`, random weights (seed 0), saved with its processor; returns params."""
    from transformers import AutoModelForImageTextToText, CLIPImageProcessor, LlavaConfig, LlavaProcessor

    from dpokit.core.models import build_tiny_tokenizer
    from dpokit.core.vision import LLAVA_IMAGE, _chat_template

    side = image_side(image_tokens)
    shape = SIZES[size]
    tokenizer = build_tiny_tokenizer("llama")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", LLAVA_IMAGE]})
    text = dict(model_type="llama", vocab_size=len(tokenizer), tie_word_embeddings=False,
                max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape["text"])
    config = LlavaConfig(
        text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(LLAVA_IMAGE),
        vision_config=dict(model_type="clip_vision_model", image_size=side, patch_size=PATCH, **shape["vision"]),
        vision_feature_select_strategy="default", vision_feature_layer=-1, projector_hidden_act="gelu",
    )
    image_processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=_chat_template(LLAVA_IMAGE))
    tokenizer.chat_template = processor.chat_template
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(config)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------- data
def synthetic_image(rng: np.random.Generator, side: int):
    from PIL import Image, ImageDraw

    noise = rng.integers(0, 64, (side, side, 3), dtype=np.uint8) + rng.integers(0, 160, 3, dtype=np.uint8)
    image = Image.fromarray(noise.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = (int(v) for v in rng.integers(0, side * 3 // 4, 2))
        x1, y1 = x0 + int(rng.integers(side // 8, side // 3)), y0 + int(rng.integers(side // 8, side // 3))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)([x0, y0, x1, y1], fill=colour)
    return image


def answer_text(rng: np.random.Generator, words: list[str], n_tokens: int, length) -> str:
    """Words drawn at random until the answer is exactly n_tokens tokens (as `length` counts them), topped up with
    single-token full stops."""
    text = ""
    while True:
        candidate = (text + " " + words[int(rng.integers(len(words)))]).strip()
        if length(candidate) > n_tokens:
            break
        text = candidate
    while length(text) < n_tokens:
        text += "."
    if length(text) != n_tokens:
        raise RuntimeError(f"could not build an answer of exactly {n_tokens} tokens ({length(text)})")
    return text


def make_examples(processor, n: int, answer_tokens: int, seed: int) -> list[dict]:
    """TRL's vision preference format (images + conversational prompt with an image part), the same in both arms."""
    from dpokit.core.templates import render_responses

    words = [w for w in (Path(__file__).resolve().parents[1] / "src" / "dpokit" / "assets" /
                         "tiny_corpus.txt").read_text(encoding="utf-8").split("\n") if w.isalpha()]
    tokenizer = processor.tokenizer
    side = processor.image_processor.crop_size["height"]
    rng = np.random.default_rng(seed)

    def length(text):  # the answer's tokens as both sides encode it: the template's end-of-turn tokens included
        _, (rendered,) = render_responses([{"role": "user", "content": "q"}],
                                          [[{"role": "assistant", "content": text}]], tokenizer)
        return len(tokenizer(rendered, add_special_tokens=False)["input_ids"])

    out = []
    for i in range(n):
        out.append({
            "images": [synthetic_image(rng, side)],
            "prompt": [{"role": "user", "content": [{"type": "image"},
                                                    {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]}],
            "chosen": [{"role": "assistant", "content": answer_text(rng, words, answer_tokens, length)}],
            "rejected": [{"role": "assistant", "content": answer_text(rng, words, answer_tokens, length)}],
        })
    return out


# ------------------------------------------------------------------------------------------------------------ arm
def step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Seconds between consecutive step ends (the first from the start of training): batch fetch + step."""

        def __init__(self):
            self.ends = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.ends = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

        def seconds(self):
            return [b - a for a, b in zip(self.ends, self.ends[1:])]

    return StepTimer()


class ImageCounter:
    """Images the vision tower really encodes (a forward hook on its patch embeddings, inside the tower: a tower
    call answered from dpokit's SharedTowerOutput does not reach them)."""

    def __init__(self, model):
        from dpokit.core.vision import vision_tower

        self.images = 0
        embeddings = next(m for n, m in vision_tower(model).named_modules() if n.endswith("embeddings"))
        embeddings.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, out):
        self.images += (args[0] if args else kwargs["pixel_values"]).shape[0]


def training_kwargs(opts, out_dir: str) -> dict:
    return dict(output_dir=out_dir, per_device_train_batch_size=opts.batch_size, learning_rate=opts.lr,
                max_steps=opts.warmup_steps + opts.steps, bf16=False, fp16=False, gradient_checkpointing=False,
                logging_steps=10**6, save_strategy="no", report_to=[], seed=opts.seed, data_seed=opts.seed,
                use_cpu=True, dataloader_pin_memory=False, disable_tqdm=True)


def load_pair_of_models(model_dir: str):
    """Policy and a separate frozen reference: two loads of the same weights; the policy's vision tower frozen."""
    from dpokit.core.vision import load_vlm, vision_tower
    from dpokit.train.trainer import disable_dropout

    policy = load_vlm(model_dir)
    disable_dropout(policy)
    vision_tower(policy).requires_grad_(False)  # train.freeze_vision: true, the same in both arms
    ref = load_vlm(model_dir).eval().requires_grad_(False)
    return policy, ref


def arm_dpokit(opts, examples, processor, tmp):
    from transformers import TrainingArguments

    from dpokit.core.config import TrainConfig
    from dpokit.core.vision import encode_vision_pair, share_frozen_tower
    from dpokit.train.trainer import DPOTrainer
    from dpokit.train.vision import VisionPairCollator

    start = time.perf_counter()
    pairs = [encode_vision_pair({k: e[k] for k in ("prompt", "chosen", "rejected")}, e["images"], processor)
             for e in examples]
    encode_s = time.perf_counter() - start
    policy, ref = load_pair_of_models(opts.model_dir)
    counters = [ImageCounter(policy), ImageCounter(ref)]
    timer = step_timer()
    trainer = DPOTrainer(model=policy, args=TrainingArguments(remove_unused_columns=False, **training_kwargs(opts, tmp)),
                         train_dataset=pairs, processing_class=processor.tokenizer,
                         data_collator=VisionPairCollator(processor.tokenizer.pad_token_id),
                         dpo_cfg=TrainConfig(loss="sigmoid", beta=0.1, learning_rate=opts.lr), ref_model=ref,
                         callbacks=[timer])
    trainer.vision_share = share_frozen_tower(policy, ref)  # as `dpokit train` sets it up (build_trainer)
    trainer.train()
    image_id = policy.config.image_token_id
    layout = {"prompt_tokens": len(pairs[0]["prompt_ids"]), "image_tokens": pairs[0]["prompt_ids"].count(image_id),
              "chosen_tokens": len(pairs[0]["chosen_ids"]), "rejected_tokens": len(pairs[0]["rejected_ids"]),
              "rows_per_step": opts.batch_size, "row_tokens": len(pairs[0]["prompt_ids"]) + 2 * opts.answer_tokens}
    shared = trainer.vision_share.hits if trainer.vision_share is not None else 0
    return timer.seconds(), [c.images for c in counters], {"encode_s": round(encode_s, 3), "layout": layout,
                                                           "reference_reused_policy_encodes": shared}


def arm_trl(opts, examples, processor, tmp):
    from datasets import Dataset
    from trl import DPOConfig
    from trl import DPOTrainer as TRLDPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    dataset = Dataset.from_list(examples)
    policy, ref = load_pair_of_models(opts.model_dir)
    counters = [ImageCounter(policy), ImageCounter(ref)]
    timer = step_timer()
    args = DPOConfig(beta=0.1, loss_type=["sigmoid"], max_length=None, **training_kwargs(opts, tmp))
    trainer = TRLDPOTrainer(model=policy, ref_model=ref, args=args, processing_class=processor,
                            train_dataset=dataset, callbacks=[timer])
    assert isinstance(trainer.data_collator, DataCollatorForVisionPreference), type(trainer.data_collator)
    trainer.train()
    probe = DataCollatorForVisionPreference(processor)([dict(e) for e in examples[:1]])
    layout = {"rows_per_step": 2 * opts.batch_size, "row_tokens": int(probe["input_ids"].shape[1]),
              "completion_tokens_per_row": int(probe["completion_mask"][0].sum())}
    return timer.seconds(), [c.images for c in counters], {"layout": layout}


def run_arm(opts) -> dict:
    from dpokit.core.vision import load_processor

    processor = load_processor(opts.model_dir)
    # Both arms import both stacks before the memory window opens: imports are not the training's memory.
    import datasets  # noqa: F401
    import trl.trainer.dpo_trainer  # noqa: F401
    from transformers import Trainer  # noqa: F401

    import dpokit.train.trainer  # noqa: F401
    import dpokit.train.vision  # noqa: F401

    with tempfile.TemporaryDirectory() as tmp, PeakMemory("cpu") as mem:
        examples = make_examples(processor, opts.batch_size * (opts.warmup_steps + opts.steps), opts.answer_tokens,
                                 opts.seed)
        seconds, images, info = (arm_dpokit if opts.arm == "dpokit" else arm_trl)(opts, examples, processor, tmp)
    steps = opts.warmup_steps + opts.steps
    if len(seconds) != steps:
        raise RuntimeError(f"{opts.arm}: {len(seconds)} steps ran, {steps} expected")
    return {"arm": opts.arm, "step_seconds": seconds[opts.warmup_steps:], "warmup_step_seconds": seconds[:opts.warmup_steps],
            "peak_memory_mb": mem.peak_mb, "images_encoded_per_step": {"policy": images[0] // steps,
                                                                       "reference": images[1] // steps},
            "threads": torch.get_num_threads(), **info}


# ----------------------------------------------------------------------------------------------------------- main
def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "unknown"
    fields = {}
    for line in lines:
        if ":" in line:
            key, value = (s.strip() for s in line.split(":", 1))
            fields.setdefault(key, value)
    name = fields.get("model name", platform.processor() or "unknown")
    extra = [f"family {fields['cpu family']} model {fields['model']}" if "cpu family" in fields else "",
             f"{os.cpu_count()} logical CPUs", "virtualised" if "hypervisor" in fields.get("flags", "") else ""]
    return f"{name} ({', '.join(e for e in extra if e)})"


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("transformers", "trl", "datasets"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    try:  # this tree's dpokit (sys.path above), not whichever is installed
        out["dpokit_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out["dpokit_commit"] = None
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="30m", choices=list(SIZES), help="model shape (tiny: for the test)")
    ap.add_argument("--image-tokens", type=int, default=256, help="image tokens per prompt (a square: 256, 576)")
    ap.add_argument("--answer-tokens", type=int, default=64, help="tokens in each answer")
    ap.add_argument("--batch-size", type=int, default=4, help="pairs per step, both arms")
    ap.add_argument("--warmup-steps", type=int, default=1, help="untimed steps first")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per arm and round")
    ap.add_argument("--rounds", type=int, default=1, help="fresh processes per arm (order alternates)")
    ap.add_argument("--lr", type=float, default=5e-6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/vlm_throughput.json")
    ap.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # internal: run one arm in this process
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--arm-out", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def forwarded(opts) -> list[str]:
    return ["--size", opts.size, "--image-tokens", str(opts.image_tokens), "--answer-tokens", str(opts.answer_tokens),
            "--batch-size", str(opts.batch_size), "--warmup-steps", str(opts.warmup_steps), "--steps",
            str(opts.steps), "--lr", str(opts.lr), "--seed", str(opts.seed)]


def main(argv=None) -> dict:
    opts = parse_args(argv)
    if opts.arm:  # a child process: one arm, its result as JSON
        Path(opts.arm_out).write_text(json.dumps(run_arm(opts)))
        return {}
    image_side(opts.image_tokens)
    runs = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        params = build_model(opts.size, opts.image_tokens, model_dir)
        print(f"LLaVA-style {opts.size}: {params / 1e6:.1f}M params, {opts.image_tokens} image tokens per prompt, "
              f"{opts.answer_tokens}-token answers, {opts.batch_size} pairs per step, {opts.warmup_steps} warm-up + "
              f"{opts.steps} timed steps x {opts.rounds} round(s), fp32, CPU: {cpu_name()}", flush=True)
        for rnd in range(opts.rounds):
            for arm in ARMS if rnd % 2 == 0 else ARMS[::-1]:
                arm_out = Path(tmp) / f"{arm}_{rnd}.json"
                cmd = [sys.executable, str(Path(__file__).resolve()), "--arm", arm, "--model-dir", str(model_dir),
                       "--arm-out", str(arm_out), *forwarded(opts)]
                load_before = os.getloadavg()[0]
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    raise SystemExit(f"{arm} arm failed (rc {res.returncode}):\n{res.stderr[-4000:]}")
                run = json.loads(arm_out.read_text())
                run["load_average_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
                runs[arm].append(run)
                print(f"  round {rnd + 1} {arm:7s} steps {' '.join(f'{s:.2f}' for s in run['step_seconds'])} s  "
                      f"peak {run['peak_memory_mb']:.0f} MB  load {run['load_average_1min']}", flush=True)

    arms = {}
    for arm, rs in runs.items():
        steps = [s for r in rs for s in r["step_seconds"]]
        median = statistics.median(steps)
        row = {"pairs_per_s": round(opts.batch_size / median, 4), "step_s_median": round(median, 3),
               "step_s_each": [round(s, 3) for s in steps], "step_s_min": round(min(steps), 3),
               "pairs_per_s_fastest_step": round(opts.batch_size / min(steps), 4),
               "load_average_1min_before_after_each_round": [r["load_average_1min"] for r in rs],
               "warmup_step_s": [round(s, 3) for r in rs for s in r["warmup_step_seconds"]],
               "peak_memory_mb": round(max(r["peak_memory_mb"] for r in rs), 1),
               "peak_memory_mb_each_round": [round(r["peak_memory_mb"], 1) for r in rs],
               "images_encoded_per_step": rs[0]["images_encoded_per_step"], "layout": rs[0]["layout"],
               "threads": rs[0]["threads"]}
        if arm == "dpokit":
            encode = statistics.median(r["encode_s"] for r in rs)
            pairs = opts.batch_size * (opts.warmup_steps + opts.steps)
            row["encode_s"] = round(encode, 3)
            row["encode_s_per_pair"] = round(encode / pairs, 4)
            row["pairs_per_s_with_encode"] = round(opts.batch_size / (median + opts.batch_size * encode / pairs), 4)
            row["reference_reused_policy_encodes"] = rs[0]["reference_reused_policy_encodes"]
        arms[arm] = row
    ours, theirs = arms["dpokit"], arms["trl"]
    ratios = {"pairs_per_s": round(ours["pairs_per_s"] / theirs["pairs_per_s"], 3),
              "pairs_per_s_with_encode": round(ours["pairs_per_s_with_encode"] / theirs["pairs_per_s"], 3),
              "pairs_per_s_fastest_step": round(ours["pairs_per_s_fastest_step"] / theirs["pairs_per_s_fastest_step"],
                                                3),
              "peak_memory": round(ours["peak_memory_mb"] / theirs["peak_memory_mb"], 3)}
    result = {
        "benchmark": "vlm_throughput", "cpu": cpu_name(), "versions": versions(),
        "model": {"family": "llava (dpokit-tiny-vlm scaled)", "size": opts.size, "params": params,
                  "image_tokens_per_prompt": opts.image_tokens, "image_px": image_side(opts.image_tokens),
                  "patch_px": PATCH, **SIZES[opts.size]},
        "settings": {**{k: v for k, v in vars(opts).items() if k not in ("arm", "model_dir", "arm_out")},
                     "dtype": "fp32", "device": "cpu", "finetuning": "full (no LoRA), both arms",
                     "freeze_vision": True, "reference": "separate frozen model (second load of the same weights), "
                     "both arms", "loss": "sigmoid, beta 0.1", "optimizer": "Trainer default (adamw_torch), both arms",
                     "gradient_checkpointing": False, "attention": "sdpa",
                     "dpokit_reference_image_encodes": "reused from the policy's frozen tower in the same step "
                     "(share_frozen_tower, as `dpokit train` does); TRL encodes in both models",
                     "timing": "end of previous step to end of step (includes the batch fetch + collation); "
                     "dpokit's one-time encode is outside (see encode_s, pairs_per_s_with_encode)",
                     "memory": "peak RSS growth of the arm's process after imports (data, two model loads, trainer, "
                     "steps), sampled every 5 ms after malloc_trim; max over rounds"},
        "arms": arms, "ratios_dpokit_over_trl": ratios, "target": TARGET,
        "meets_target": {"pairs_per_s": ratios["pairs_per_s"] >= TARGET["pairs_per_s_ratio_min"],
                         "peak_memory": ratios["peak_memory"] <= TARGET["peak_memory_ratio_max"]},
    }
    print(f"\n{'arm':8s} {'pairs/s':>8s} {'step s':>7s} {'peak MB':>8s} {'images/step (policy+ref)':>25s}")
    for arm, row in arms.items():
        im = row["images_encoded_per_step"]
        print(f"{arm:8s} {row['pairs_per_s']:8.3f} {row['step_s_median']:7.2f} {row['peak_memory_mb']:8.0f} "
              f"{im['policy'] + im['reference']:25d}")
    print(f"dpokit / TRL: pairs/s {ratios['pairs_per_s']:.2f}x (with dpokit's encode charged: "
          f"{ratios['pairs_per_s_with_encode']:.2f}x), peak memory {ratios['peak_memory']:.2f}  "
          f"(target >= {TARGET['pairs_per_s_ratio_min']}x, <= {TARGET['peak_memory_ratio_max']})")
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(result, indent=2))
    print("wrote", opts.out)
    return result


if __name__ == "__main__":
    main()
