"""Keep the best point on the training path, not the last (`train.select: best_judge`; docs/select.md).

Over-optimisation is the common way DPO fails: the held-out pairs keep improving while the answers drift past what
the judge rewards. `SelectionCallback` evaluates `train.select_points` evenly spaced optimizer steps (the last step
always among them) on `train.select_prompts` held-out prompts with the evaluation's own judge: one answer per prompt
with the evaluation's decoding (seed, temperature, engine), judged against base answers sampled once before the
first step; win rate vs the base (Wilson interval), mean judge score (pointwise judges) and KL(point || base) on the
point's own samples. The point with the highest lower bound of its win-rate interval is kept (ties: higher mean
score, then the lower KL, then the earlier step), and `finish` loads its weights into the model before the run's
model is saved.

Everything lives in the run folder through RunDir: `selection.json` (`Selection`) and the kept point's weights
`selection/step-N.safetensors` (LoRA: the adapter's state dict, a few MB; full fine-tune: the whole model), so
`--resume` continues with the points evaluated before the checkpoint. Training itself is untouched: the sampler has
its own seeded generator and the global RNG state is restored after every point.

Sampling, judging and the interval arithmetic are dpokit's shared ones (`dpokit.core.sampling`, `dpokit.core.judges`,
`dpokit.core.stats`), the same the final evaluation uses.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from transformers import TrainerCallback

from dpokit.core.config import RunConfig
from dpokit.core.judges import build_judge, compare
from dpokit.core.run import Metric, RunDir, Selection, SelectionPoint
from dpokit.core.sampling import sample
from dpokit.core.scoring import response_logps
from dpokit.core.stats import interval, kl_summary, outcome_summary
from dpokit.data import distinct_prompts, prompt_key

log = logging.getLogger(__name__)

CRITERION = ("highest lower bound of the win rate's 95% Wilson interval vs the base; ties: higher mean judge "
             "score, then lower KL, then the earlier step")


def planned_steps(max_steps: int, points: int) -> list[int]:
    """`points` evenly spaced optimizer steps ending at `max_steps` (fewer when the run has fewer steps)."""
    if max_steps <= 0:
        return []
    return sorted({max(1, round(k * max_steps / points)) for k in range(1, points + 1)})


def selection_prompts(eval_rows: list[dict], cfg: RunConfig) -> tuple[list, int]:
    """(prompts, overlap): the last `train.select_prompts` distinct held-out prompts, so that they avoid the first
    `eval.num_prompts` the final evaluation answers whenever there are enough; overlap = how many they share."""
    prompts = distinct_prompts(eval_rows)
    chosen = prompts[-cfg.train.select_prompts:]
    evaluated = {prompt_key(p) for p in prompts[:cfg.eval.num_prompts]}
    return chosen, sum(prompt_key(p) in evaluated for p in chosen)


def better(a: SelectionPoint, b: SelectionPoint | None) -> bool:
    """Whether point `a` ranks above `b` under CRITERION."""
    if b is None:
        return True

    def key(p: SelectionPoint):
        score = p.mean_score.value if p.mean_score is not None and p.mean_score.value is not None else 0.0
        kl = p.kl.value if p.kl is not None and p.kl.value is not None else 0.0
        return (round(p.win_rate.ci[0] or 0.0, 12), round(score, 12), -round(kl, 12), -p.step)

    return key(a) > key(b)


def is_adapter(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


@contextlib.contextmanager
def kept_rng():
    """The training's random state, untouched by what happens inside."""
    cpu = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class SelectionCallback(TrainerCallback):
    """Evaluates the planned steps with the judge and keeps the best point's weights (see the module doc)."""

    def __init__(self, cfg: RunConfig, run_dir: RunDir, tokenizer, eval_rows: list[dict], ref_model=None,
                 resume_step: int | None = None):
        self.cfg, self.run_dir, self.tokenizer, self.ref_model = cfg, run_dir, tokenizer, ref_model
        self.prompts, self.overlap = selection_prompts(eval_rows, cfg)
        self.judge = build_judge(cfg.eval.judge, cfg.eval.judge_options)
        e = cfg.eval
        self.decoding = {"temperature": e.temperature, "top_p": e.top_p, "max_new_tokens": e.max_new_tokens,
                         "seed": e.seed, "engine": e.engine}
        self.resume_step, self.disabled = resume_step, False
        self.record: Selection | None = self._resumed(resume_step) if resume_step is not None else None
        # The kept point as of the last checkpoint: its weights stay on disk until the next checkpoint, so a
        # --resume from that checkpoint still finds them.
        self.saved_best = self.record.kept_step if self.record is not None else None

    # --- state ---------------------------------------------------------------------------------------------------

    def _resumed(self, step: int) -> Selection | None:
        """selection.json as of checkpoint `step`: later points are dropped (the resumed run evaluates them again,
        identically) and the kept point recomputed among the others."""
        record = self.run_dir.read_selection()
        if record is None:
            return None
        record.points = [p for p in record.points if p.step <= step]
        best = None
        for p in record.points:
            best = p if better(p, best) else best
        record.kept_step = best.step if best is not None else None
        if best is not None and not self.run_dir.selection_weights(best.step).is_file():
            log.warning("selection: the weights of step %d are missing; selection restarts at this checkpoint",
                        best.step)
            record.points, record.kept_step = [], None
        return record

    def _decode(self, model) -> list:
        e = self.cfg.eval
        with kept_rng():
            return [per[0] for per in sample(model, self.tokenizer, self.prompts, num_samples=1,
                                              batch_size=e.gen_batch_size, system_prompt=self.cfg.data.system_prompt,
                                              **self.decoding)]

    @contextlib.contextmanager
    def _base(self, model):
        """The base model: the policy under its disabled adapter (LoRA), the frozen reference copy, or None."""
        if is_adapter(model):
            with model.disable_adapter():
                yield model
        elif self.ref_model is not None and not self.cfg.train.reference_model:
            yield self.ref_model
        else:
            yield None

    def _start(self, model, max_steps: int) -> Selection:
        """The base answers (sampled once, before the first step) and their scores."""
        start = time.time()
        with self._base(model) as base:
            samples = self._decode(base if base is not None else model)  # full fine-tune at step 0: the base
        texts = [s.text for s in samples]
        scores = None
        if getattr(self.judge, "kind", "pointwise") != "pairwise":
            scores = [float(x) for x in self.judge.score(self.prompts, texts)]
        return Selection(select="best_judge", criterion=CRITERION, judge=self.cfg.eval.judge, prompts=self.prompts,
                         overlap_with_eval_prompts=self.overlap, decoding=self.decoding, base_answers=texts,
                         base_tokens=[len(s.response_ids) for s in samples], base_scores=scores,
                         base_mean_score=interval(scores) if scores else None,
                         base_seconds=time.time() - start,
                         planned_steps=planned_steps(max_steps, self.cfg.train.select_points),
                         seconds=time.time() - start)

    # --- one point -------------------------------------------------------------------------------------------------

    def evaluate_point(self, model, step: int, epoch: float | None) -> SelectionPoint:
        """Answer the selection prompts with the current weights, judge them against the base answers, KL."""
        start = time.time()
        was_training = model.training
        try:
            samples = self._decode(model)
            texts = [s.text for s in samples]
            cmp = compare(self.judge, self.prompts, texts, self.record.base_answers, self.record.base_scores)
            out = outcome_summary(cmp.outcomes)
            kl = self._kl(model, samples)
        finally:
            model.train(was_training)
        return SelectionPoint(
            step=step, epoch=epoch, outcomes={k: getattr(out, k) for k in ("wins", "ties", "losses", "unparseable")},
            win_rate=out.win_rate, mean_score=interval(cmp.scores_a) if cmp.scores_a else None,
            kl=kl, mean_tokens=sum(len(s.response_ids) for s in samples) / max(1, len(samples)),
            seconds=time.time() - start)

    def _kl(self, model, samples) -> Metric | None:
        p_ids, r_ids = [s.prompt_ids for s in samples], [s.response_ids for s in samples]
        bs = self.cfg.eval.batch_size
        if all(s.token_logps is not None for s in samples):
            lp_t, n_tok = [sum(s.token_logps) for s in samples], [len(s.response_ids) for s in samples]
        else:
            lp_t, n_tok = response_logps(model, p_ids, r_ids, self.tokenizer.pad_token_id, bs)
        with self._base(model) as base:
            if base is None:
                return None
            lp_b, _ = response_logps(base, p_ids, r_ids, self.tokenizer.pad_token_id, bs)
        return kl_summary(lp_t, lp_b, n_tok).sequence

    # --- weights ---------------------------------------------------------------------------------------------------

    def _save_weights(self, model, step: int) -> None:
        path = self.run_dir.selection_weights(step)
        path.parent.mkdir(parents=True, exist_ok=True)
        if is_adapter(model):
            from peft import get_peft_model_state_dict

            state = {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(model).items()}
            save_file(state, str(path))
        else:
            save_model(model, str(path))

    def _load_weights(self, model, step: int) -> None:
        path = self.run_dir.selection_weights(step)
        if is_adapter(model):
            from peft import set_peft_model_state_dict

            device = next(model.parameters()).device
            set_peft_model_state_dict(model, {k: v.to(device) for k, v in load_file(str(path)).items()})
        else:
            load_model(model, str(path), device=str(next(model.parameters()).device))

    def _prune(self, keep: set[int | None]) -> None:
        if not self.run_dir.selection_dir.is_dir():
            return
        for f in self.run_dir.selection_dir.glob("step-*.safetensors"):
            if int(f.stem.split("-", 1)[1]) not in keep:
                f.unlink(missing_ok=True)

    # --- Trainer hooks ---------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.record is not None:
            return
        if self.resume_step is not None and not is_adapter(model) and self._base_model_missing():
            # A full fine-tune resumed without selection.json: the model is no longer the base, and no copy of it
            # is in memory to answer for the base.
            log.warning("selection: resumed without selection.json and no base model in memory; keeping the last")
            self.disabled = True
            return
        self.record = self._start(model, state.max_steps)
        self.run_dir.write_selection(self.record)

    def _base_model_missing(self) -> bool:
        return self.ref_model is None or bool(self.cfg.train.reference_model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._maybe_evaluate(model, state.global_step, state.epoch)

    def on_save(self, args, state, control, **kwargs):
        if self.record is None:
            return
        self.saved_best = self.record.kept_step
        self._prune({self.saved_best})

    def _maybe_evaluate(self, model, step: int, epoch: float | None, final: bool = False) -> None:
        if self.record is None:
            return
        done = {p.step for p in self.record.points}
        if step in done or not (final or step in self.record.planned_steps):
            return
        point = self.evaluate_point(model, step, epoch)
        kept = next((p for p in self.record.points if p.step == self.record.kept_step), None)
        self.record.points.append(point)
        self.record.seconds += point.seconds
        if better(point, kept):
            self._save_weights(model, step)
            self.record.kept_step = step
            self._prune({step, self.saved_best})
        log.info("selection: step %d win rate %.3f [%.3f, %.3f]%s", step, point.win_rate.value,
                 *point.win_rate.ci, " (kept)" if self.record.kept_step == step else "")
        self.run_dir.write_selection(self.record)

    def finish(self, model, step: int, epoch: float | None) -> Selection | None:
        """After the last step: evaluate it if it was not (a run stopped early), then load the kept point's weights
        into `model`, which the caller saves as the run's model."""
        self._maybe_evaluate(model, step, epoch, final=True)
        if self.record is None:
            return None
        self.record.final_step = step
        if self.record.kept_step is not None and self.record.kept_step != step:
            self._load_weights(model, self.record.kept_step)
        self.run_dir.write_selection(self.record)
        return self.record
