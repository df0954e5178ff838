"""train.select: best_judge keeps the best evaluated point of the training path, not the last (issue 26).

Real tiny models and real training throughout. The over-trained case is constructed with a python judge whose verdict
depends on the point being judged (it counts its calls: the base answers are scored once, then each point's answers
once), so which point is best is known exactly; the resume test uses the real sentiment judge."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from conftest import run_main, tiny_config
from dpokit.core.config import config_from_dict
from dpokit.core.io import read_jsonl
from dpokit.train.select import planned_steps

PROMPTS = 8  # train.select_prompts in these tests

# Scores by phase: phase 0 = the base answers (scored once), phase k = the k-th evaluated point. The share of a
# point's answers that beat the base (score 1 vs 0; the others lose with -1).
JUDGE = """
CALLS = [0]
SHARES = {shares}

def score(prompt, response):
    n = CALLS[0]
    CALLS[0] += 1
    phase, i = divmod(n, {prompts})
    if phase == 0:
        return 0.0
    return 1.0 if i < SHARES[min(phase, len(SHARES)) - 1] * {prompts} else -1.0
"""


def _judge(tmp_path, shares, name="run"):
    path = tmp_path / f"phase_judge_{name}.py"  # a file per run: its call counter starts at 0
    path.write_text(JUDGE.format(shares=list(shares), prompts=PROMPTS))
    return {"judge": "python", "judge_options": {"function": f"{path}:score"}}


def _cfg(tmp_path, name, select="best_judge", judge=None, lora=True, **train):
    t = {"select": select, "select_points": 4, "select_prompts": PROMPTS, "max_steps": 8, "learning_rate": 1e-3,
         "batch_size": 4, "seed": 3, **train}
    if lora:
        t["lora"] = {"r": 4, "alpha": 8}
    ev = {"max_new_tokens": 8, "num_prompts": 4, **(judge or {})}
    return config_from_dict(tiny_config(tmp_path, output={"dir": str(tmp_path / name)}, train=t, eval=ev))


def _train(cfg, callbacks=None):
    from dpokit.train.plan import plan_training
    from dpokit.train.trainer import run_training

    return run_training(plan_training(cfg, evaluate=True), callbacks=callbacks).run_dir


class CaptureAdapter(TrainerCallback):
    """The LoRA adapter's weights at every optimizer step, to compare the saved model with."""

    def __init__(self):
        self.by_step = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        from peft import get_peft_model_state_dict

        self.by_step[state.global_step] = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def _adapter(run_dir):
    return load_file(str(run_dir / "model" / "adapter_model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].dtype)) for k in a)


def test_planned_steps_are_evenly_spaced_and_end_at_the_last_step():
    assert planned_steps(8, 4) == [2, 4, 6, 8]
    assert planned_steps(72, 4) == [18, 36, 54, 72]
    assert planned_steps(3, 4) == [1, 2, 3]
    assert planned_steps(0, 4) == []


def test_best_judge_keeps_the_point_that_beats_the_over_trained_last(tmp_path):
    # Point 2 (step 4) wins every answer; the last point (step 8) loses every answer: over-trained.
    cfg = _cfg(tmp_path, "run", judge=_judge(tmp_path, [0.5, 1.0, 0.25, 0.0]))
    capture = CaptureAdapter()
    run = _train(cfg, [capture])
    record = json.loads((run / "selection.json").read_text())
    assert [p["step"] for p in record["points"]] == record["planned_steps"] == [2, 4, 6, 8]
    assert [p["outcomes"]["wins"] for p in record["points"]] == [4, 8, 2, 0]
    assert record["points"][-1]["win_rate"]["ci"][1] < 0.5  # the last point lost to the base
    assert record["kept_step"] == 4 and record["final_step"] == 8
    assert all(p["kl"] is not None and p["kl"]["n"] == PROMPTS for p in record["points"])
    saved = _adapter(run)
    assert _same(saved, capture.by_step[4]) and not _same(saved, capture.by_step[8])
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["select"] == "best_judge" and summary["kept_step"] == 4 and summary["selection_seconds"] > 0
    assert not (run / "selection").exists()  # the kept weights are model/ now


def test_select_last_is_todays_output_and_selection_does_not_perturb_training(tmp_path):
    # The judge makes the last point the best, so best_judge keeps step 8: the same weights as select: last, and
    # the same losses step by step (sampling draws from its own generator; the global RNG is restored).
    last = _train(_cfg(tmp_path, "last", select="last", judge=_judge(tmp_path, [0.25, 0.5, 0.75, 1.0], "last")))
    best = _train(_cfg(tmp_path, "best", judge=_judge(tmp_path, [0.25, 0.5, 0.75, 1.0], "best")))
    assert not (last / "selection.json").exists()
    assert json.loads((last / "train_summary.json").read_text())["select"] == "last"
    assert json.loads((best / "selection.json").read_text())["kept_step"] == 8
    assert _same(_adapter(last), _adapter(best))
    losses = [[r.get("loss") for r in read_jsonl(d / "metrics.jsonl") if "loss" in r] for d in (last, best)]
    assert losses[0] == losses[1]


class CrashAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("simulated crash")


@pytest.mark.slow
def test_resume_keeps_the_selection_state(tmp_path):
    # Full fine-tune (the kept point is a whole-model copy), the real sentiment judge. The crash comes after the
    # checkpoint at step 5 and after point 8 was evaluated: the resumed run drops point 8, evaluates it again and
    # ends with the straight run's selection and weights.
    kw = dict(lora=False, max_steps=10, save_steps=5, select_points=4, learning_rate=5e-3)
    straight = _train(_cfg(tmp_path, "straight", **kw))
    split_cfg = _cfg(tmp_path, "split", **kw)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(split_cfg, [CrashAt(9)])
    before = json.loads((tmp_path / "split" / "selection.json").read_text())
    assert [p["step"] for p in before["points"]] == [2, 5, 8]
    from dpokit.train.plan import plan_training
    from dpokit.train.trainer import run_training

    run_training(plan_training(split_cfg, resume=True, evaluate=True))
    a, b = (json.loads((d / "selection.json").read_text()) for d in (straight, tmp_path / "split"))
    assert [p["step"] for p in b["points"]] == [2, 5, 8, 10]
    assert b["base_answers"] == a["base_answers"] and b["kept_step"] == a["kept_step"]
    for pa, pb in zip(a["points"], b["points"]):
        assert pa["outcomes"] == pb["outcomes"] and pa["mean_score"]["value"] == pytest.approx(
            pb["mean_score"]["value"], abs=1e-9)
    wa, wb = (load_file(str(d / "model" / "model.safetensors")) for d in (straight, tmp_path / "split"))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0) for k in wa)


@pytest.mark.parametrize("sets, expected", [
    (["train.select=best_judge", "eval.generate=false"], "train.select: best_judge needs a judge"),
    (["train.select=best"], "train.select"),
])
def test_bad_select_config_exits_2_with_one_line(tmp_path, capfd, sets, expected):
    from conftest import CONFIGS

    args = ["train", CONFIGS / "tiny.yaml", "--set", f"output.dir={tmp_path / 'run'}"]
    for s in sets:
        args += ["--set", s]
    res = run_main(capfd, *args)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], res.stderr
    assert "train.select: last" in lines[0] or "best_judge" in lines[0]
    assert not (tmp_path / "run").exists()


def test_report_marks_the_kept_point(tmp_path):
    from dpokit.eval import evaluate_run
    from dpokit.report import write_report

    run = _train(_cfg(tmp_path, "run", judge=_judge(tmp_path, [0.5, 1.0, 0.25, 0.0])))
    evaluate_run(run)
    html = write_report(run).read_text()
    md = (run / "report.md").read_text()
    assert "Checkpoints evaluated during training" in html and "kept (the run&#x27;s model)" in html
    row = next(line for line in md.splitlines() if line.startswith("| 4 |"))
    assert "kept" in row and "8 / 0 / 0" in row
    assert "kept step 4, not the last step 8" in md


def test_default_selects_exactly_when_a_judge_will_run(tmp_path):
    """train.select's default (auto) is best_judge when evaluation judges answers after training, and last when it
    cannot (no generation, --no-eval, no saved model); plan_training records what will run."""
    from dpokit.core.config import TrainConfig
    from dpokit.train.plan import plan_training

    assert TrainConfig().select == "auto"
    cfg = config_from_dict(tiny_config(tmp_path, output={"dir": str(tmp_path / "a")}, eval={"max_new_tokens": 8}))
    assert plan_training(cfg, evaluate=True).select == "best_judge"
    assert plan_training(cfg, evaluate=False).select == "last"
    no_gen = config_from_dict(tiny_config(tmp_path, output={"dir": str(tmp_path / "b")}, eval={"generate": False}))
    assert plan_training(no_gen, evaluate=True).select == "last"
    unsaved = config_from_dict(tiny_config(tmp_path, output={"dir": str(tmp_path / "c"), "save_model": False}))
    assert plan_training(unsaved, evaluate=True).select == "last"
