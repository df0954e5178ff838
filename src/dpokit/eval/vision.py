"""Evaluation of a vision-language run (issue 29): what `evaluate_run` does when the held-out rows carry images.

The held-out rows are data/eval.jsonl as training recorded them: messages plus each image's absolute path (images
given as bytes or PIL images were saved in the run folder's data/images/ by training). Every
image is read again before any model loads; one moved or deleted since training is one line naming the file, the
row and the image (exit 2), and nothing is written.

- Preference metrics: the same `preference_metrics` as text, from summed response log-probs of the tuned model and
  of the base (LoRA: the adapter disabled), each pair laid out as training lays it out
  (`dpokit.core.vision.pack_vision_pairs`, its images encoded once) and scored by `dpokit.core.packing.batch_logps`.
- Generation (eval.generate): `model.generate` from each distinct held-out prompt with its pixel values, the same
  seed and decoding for base and tuned (the text samplers in `dpokit.core.sampling` are text-only; the decoding
  records engine `hf`). The judge sees the images when it can: a python judge whose function takes a third
  parameter is called `score(prompt, response, images)` with PIL images; reward-model and llm judges read text
  only and are refused (`dpokit.core.judges.image_judge_problem`), at planning and here.
- KL(tuned || base) on the tuned model's samples, both models scoring prompt (with its images) + answer.

eval_samples.jsonl rows carry `images`: the prompt's image paths, for the report's thumbnails and for labelling.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dpokit.core.errors import UserError
from dpokit.core.judges import compare as judge_pairs
from dpokit.core.judges import image_judge_problem
from dpokit.core.models import pick_dtype
from dpokit.core.run import RunDir
from dpokit.core.sampling import Sample
from dpokit.core.vision import encode_vision_pair, image_token_id, load_processor, load_vlm
from dpokit.data import prompt_key
from dpokit.data.vision import load_image


def is_vision_eval(rows: list[dict]) -> bool:
    """Whether held-out rows are a vision run's (training recorded their `images`)."""
    return bool(rows) and "images" in rows[0]


def check_vision_judge(name: str, generate: bool) -> None:
    problem = image_judge_problem(name) if generate else None
    if problem:
        raise UserError(problem)


def read_eval_images(rows: list[dict], where: Path) -> list[list]:
    """Each held-out row's images as PIL images, from the absolute paths training recorded; a missing or unreadable
    one is a UserError naming data/eval.jsonl, the row and the image."""
    out = []
    for i, row in enumerate(rows, start=1):
        loc = f"{where}:{i}"
        refs = row.get("images")
        if not isinstance(refs, list):
            raise UserError(f"{loc}: 'images' must be the list of the prompt's image paths; re-run dpokit train")
        images = []
        for ref in refs:
            if not isinstance(ref, str) or not Path(ref).is_absolute():
                raise UserError(f"{loc}: image {ref!r} is not a file path (a run from before dpokit kept such images "
                                "in data/images/); train it again to evaluate it")
            if not Path(ref).is_file():
                raise UserError(f"{loc}: image {ref} not found (it was there when the run trained); put the file "
                                "back at that path, or fix the path in that row")
            images.append(load_image(ref, None, loc))
        out.append(images)
    return out


def load_vision_models(run: RunDir, cfg):
    """(tuned, base, processor) of a vision run. With LoRA `base` is None: the caller disables the adapter."""
    from peft import PeftModel

    try:
        processor = load_processor(str(run.model_dir))  # saved with the model by training
    except UserError:
        processor = load_processor(cfg.model.tokenizer or cfg.model.name_or_path, revision=cfg.model.revision,
                                   trust_remote_code=cfg.model.trust_remote_code)
    dtype = pick_dtype(cfg.model.dtype)
    base = load_vlm(cfg.model.name_or_path, dtype=dtype, revision=cfg.model.revision,
                    trust_remote_code=cfg.model.trust_remote_code)
    if run.is_adapter():
        return PeftModel.from_pretrained(base, str(run.model_dir)), None, processor
    return load_vlm(str(run.model_dir), dtype=dtype), base, processor


def encode_eval_pairs(rows: list[dict], images: list[list], processor) -> list[dict]:
    return [encode_vision_pair(row, imgs, processor) for row, imgs in zip(rows, images, strict=True)]


@torch.no_grad()
def distinct_vision_prompts(rows: list[dict], images: list[list], limit: int) -> list[tuple[dict, list]]:
    """(row, its PIL images) of the distinct held-out prompts (the prompt's text and its images), in file order."""
    seen, out = set(), []
    for row, imgs in zip(rows, images, strict=True):
        key = (prompt_key(row["prompt"]), tuple(row["images"]))
        if key not in seen:
            seen.add(key)
            out.append((row, imgs))
    return out[:limit]


def _eos_ids(tokenizer) -> set[int]:
    eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


def _trim(ids: list[int], eos_ids: set[int]) -> list[int]:
    for k, t in enumerate(ids):
        if t in eos_ids:
            return ids[:k + 1]
    return ids


@torch.no_grad()
def sample_vision(model, processor, prompts: list[dict], *, num_samples: int, max_new_tokens: int,
                  temperature: float, top_p: float, seed: int) -> list[Sample]:
    """`num_samples` answers per encoded prompt (`encode_vision_pair` output: prompt ids with the image tokens expanded,
    pixel values), through `model.generate`. Prompt i reseeds torch from (seed, i), so base and tuned draw the same
    random numbers; temperature 0 = greedy. The image placeholder token is never sampled."""
    tokenizer = processor.tokenizer
    device = next(model.parameters()).device
    eos_ids = _eos_ids(tokenizer)
    # an image placeholder in an answer would ask the model for image features it was not given (and is no answer)
    suppress = [image_token_id(processor)]
    was_training = model.training
    model.eval()
    out = []
    try:
        for i, enc in enumerate(prompts):
            ids = torch.tensor([enc["prompt_ids"]], device=device)
            images = {k: v.to(device) for k, v in enc.items() if isinstance(v, torch.Tensor)}
            torch.manual_seed(seed * 100003 + i)
            sampling = temperature > 0
            gen = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), **images, max_new_tokens=max_new_tokens,
                do_sample=sampling, temperature=temperature if sampling else None,
                top_p=top_p if sampling else None, top_k=0 if sampling else None,
                num_return_sequences=num_samples, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, suppress_tokens=suppress)
            for row in gen[:, ids.shape[1]:].tolist():
                response = _trim(row, eos_ids)
                out.append(Sample(list(enc["prompt_ids"]), response,
                                  tokenizer.decode(response, skip_special_tokens=True).strip()))
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def vision_response_logps(model, prompts: list[dict], responses: list[list[int]]) -> tuple[list[float], list[int]]:
    """Summed log-prob of each response given its encoded prompt and the prompt's images (one sequence a forward),
    and the response token counts."""
    from dpokit.core.batching import token_logps

    device = next(model.parameters()).device
    model.eval()
    sums, counts = [], []
    for enc, response in zip(prompts, responses, strict=True):
        if not response:
            sums.append(0.0)
            counts.append(0)
            continue
        p = enc["prompt_ids"]
        ids = torch.tensor([p + response], device=device)
        images = {k: v.to(device) for k, v in enc.items() if isinstance(v, torch.Tensor)}
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **images).logits
        per_token = token_logps(logits[0, len(p) - 1:-1], ids[0, len(p):])
        sums.append(float(per_token.sum()))
        counts.append(len(response))
    return sums, counts


def vision_generation_metrics(cfg, judge, prompts: list[tuple[dict, list]], tuned, as_base, processor):
    """Base and tuned answers to image prompts with identical seeds and decoding; judged tuned vs base (the images
    handed to a judge that takes them); KL on tuned samples. Returns (generation dict, kl dict, per-sample
    records), as `dpokit.eval.generation_metrics` does for text."""
    from dpokit.eval.metrics import kl_summary

    e = cfg.eval.model_copy(update={"engine": "hf"})  # model.generate: recorded as the decoding used
    # the prompt exactly as training encoded it (its chat template, image tokens expanded, its image tensors)
    encoded = [encode_vision_pair(row, imgs, processor) for row, imgs in prompts]
    decoding = dict(num_samples=e.samples_per_prompt, max_new_tokens=e.max_new_tokens, temperature=e.temperature,
                    top_p=e.top_p, seed=e.seed)
    tuned_s = sample_vision(tuned, processor, encoded, **decoding)
    with as_base() as base_model:
        base_s = sample_vision(base_model, processor, encoded, **decoding)
    k = e.samples_per_prompt
    flat = [(row, imgs, enc) for (row, imgs), enc in zip(prompts, encoded, strict=True) for _ in range(k)]
    cmp = judge_pairs(judge, [r["prompt"] for r, _, _ in flat], [s.text for s in tuned_s], [s.text for s in base_s],
                      images=[imgs for _, imgs, _ in flat])
    len_t = [len(s.response_ids) for s in tuned_s]
    len_b = [len(s.response_ids) for s in base_s]
    from dpokit.eval import generation_summary

    generation = generation_summary(e, {"name": e.judge, "kind": getattr(judge, "kind", "pointwise"),
                                        "details": cmp.details}, len(prompts), cmp.outcomes, len_t, len_b,
                                    cmp.scores_a, cmp.scores_b)
    encs = [enc for _, _, enc in flat]
    lp_t, n_tok = vision_response_logps(tuned, encs, [s.response_ids for s in tuned_s])
    with as_base() as base_model:
        lp_b, _ = vision_response_logps(base_model, encs, [s.response_ids for s in tuned_s])
    kl = kl_summary(lp_t, lp_b, n_tok, exact_sampling=e.temperature == 1.0 and e.top_p == 1.0)
    records = []
    for j, ((row, _, _), t, b) in enumerate(zip(flat, tuned_s, base_s, strict=True)):
        records.append({"prompt": row["prompt"], "sample": j % k, "base": b.text, "tuned": t.text,
                        "base_tokens": len_b[j], "tuned_tokens": len_t[j], "outcome": cmp.outcomes[j],
                        "base_score": cmp.scores_b[j] if cmp.scores_b else None,
                        "tuned_score": cmp.scores_a[j] if cmp.scores_a else None,
                        "kl_sequence": lp_t[j] - lp_b[j], "images": list(row["images"])})
    return generation, kl, records

