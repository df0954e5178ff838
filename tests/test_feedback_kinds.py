"""Feedback beyond one pair (issue 16): ranked lists and unpaired (KTO) rows through data, packing and training.

Packed lists (one prefix-shared segment per prompt) give each response the log-prob of its own separate padded
`prompt + response` sequence within 1e-5; bad ranked/unpaired rows stop with one line naming file and line."""

import json
import random

import pytest
import torch

from dpokit.core.errors import UserError
from dpokit.core.packing import as_matrix, collate_lists, list_logps
from dpokit.core.scoring import response_logps
from dpokit.data import normalise

TOL = 1e-5


def make_lists(shapes, vocab, seed=0):
    """shapes: (prompt length, [response lengths]) per row."""
    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(3, vocab) for _ in range(n)]  # noqa: E731
    return [{"prompt_ids": ids(p), "responses_ids": [ids(n) for n in rs], "scores": list(range(len(rs), 0, -1))}
            for p, rs in shapes]


# Four responses per prompt, unequal lengths, a one-token prompt, a one-token response, rows of 2 and 5 responses.
LISTS = [(6, [4, 7, 2, 5]), (1, [3, 1, 6, 2]), (9, [5, 5]), (3, [2, 8, 1, 4, 3])]


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_packed_lists_equal_separate_padded_sequences(fixture, request):
    model, tokenizer = request.getfixturevalue(fixture)
    pad = tokenizer.pad_token_id
    rows = make_lists(LISTS, model.config.vocab_size)
    model.eval()
    with torch.no_grad():
        packed, packed_n = list_logps(model, collate_lists(rows, pad, packed=True))
        padded, padded_n = list_logps(model, collate_lists(rows, pad, packed=False))
    prompts = [r["prompt_ids"] for r in rows for _ in r["responses_ids"]]
    responses = [resp for r in rows for resp in r["responses_ids"]]
    separate, counts = response_logps(model, prompts, responses, pad, batch_size=4)
    assert packed_n.tolist() == padded_n.tolist() == counts == [len(x) for x in responses]
    assert torch.allclose(packed, torch.tensor(separate, dtype=packed.dtype), atol=TOL, rtol=0)
    assert torch.allclose(padded, torch.tensor(separate, dtype=padded.dtype), atol=TOL, rtol=0)


def test_list_layout_each_response_sees_prompt_and_itself_only():
    rows = [{"prompt_ids": [5, 6, 7], "responses_ids": [[10, 11], [20], [30, 31, 32]], "scores": [3, 2, 1]}]
    b = collate_lists(rows, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 10, 11, 20, 30, 31, 32]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 3, 4, 5]]  # each response restarts at the prompt length
    m = b["attention_mask"][0, 0]
    assert m[5].tolist() == [True, True, True, False, False, True, False, False, False]  # [20] sees prompt + itself
    assert m[8].tolist() == [True, True, True, False, False, False, True, True, True]
    # the first token of every response is predicted from the last prompt token (position 2)
    first = [(int(p), int(t)) for p, t, s in zip(b["score_pos"], b["score_target"], b["score_slot"], strict=True)
             if int(t) in (10, 20, 30)]
    assert first == [(2, 10), (2, 20), (2, 30)]
    assert b["score_slot"].tolist() == [0, 0, 1, 2, 2, 2]


def test_as_matrix_pads_rows():
    values, mask = as_matrix(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), torch.tensor([2, 3]))
    assert values.tolist() == [[1.0, 2.0, 0.0], [3.0, 4.0, 5.0]]
    assert mask.tolist() == [[True, True, False], [True, True, True]]


# --- data: kinds, conversions, checks ------------------------------------------------------------------------

def test_ranked_rows_are_sorted_best_first_and_ranks_become_scores():
    rows, fmt, _ = normalise([{"prompt": "Q?", "responses": [" a", " b", " c"], "scores": [1, 3, 2]},
                              {"prompt": "R?", "responses": [" x", " y"], "ranks": [2, 1]}], "auto", {}, "raise", "t")
    assert fmt == "ranked"
    assert rows[0] == {"prompt": "Q?", "responses": [" b", " c", " a"], "scores": [3.0, 2.0, 1.0]}
    assert rows[1] == {"prompt": "R?", "responses": [" y", " x"], "scores": [-1.0, -2.0]}


def test_trl_unpaired_format_is_detected():
    rows, fmt, _ = normalise([{"prompt": "Q?", "completion": " a", "label": True},
                              {"prompt": [{"role": "user", "content": "Q?"}],
                               "completion": [{"role": "assistant", "content": "b"}], "label": False}],
                             "auto", {}, "raise", "t")
    assert fmt == "unpaired"
    assert rows[0] == {"prompt": "Q?", "completion": " a", "label": True}
    assert rows[1]["completion"] == [{"role": "assistant", "content": "b"}] and rows[1]["label"] is False


def _load(tmp_path, rows, **data):
    from dpokit.core.config import DataConfig
    from dpokit.data import load_preferences

    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_preferences(DataConfig(source=str(src), eval_fraction=0.0, **data))


ULTRAFEEDBACK_RAW = [{"instruction": f"Q{i}?", "completions": [
    {"response": f"best {i}", "overall_score": 9.0}, {"response": f"worst {i}", "overall_score": 2.0},
    {"response": f"mid {i}", "overall_score": 6.5}, {"response": f"good {i}", "overall_score": 8.0}]} for i in range(3)]


def test_ultrafeedback_raw_to_ranked_keeps_every_completion(tmp_path):
    data = _load(tmp_path, ULTRAFEEDBACK_RAW, kind="ranked")
    assert data.kind == "ranked" and data.format == "scored" and len(data.train) == 3
    row = data.train[0]
    assert [m[0]["content"] for m in row["responses"]] == ["best 0", "good 0", "mid 0", "worst 0"]
    assert row["scores"] == [9.0, 8.0, 6.5, 2.0]
    assert data.report.checks.train.responses_per_row == {"4": 3}
    # the same file without data.kind stays best-vs-worst pairs, as before
    pairs = _load(tmp_path, ULTRAFEEDBACK_RAW)
    assert pairs.kind == "pair" and pairs.train[0]["chosen"][0]["content"] == "best 0"


def test_pairs_split_into_unpaired_rows_on_the_same_side_of_the_split(tmp_path):
    rows = [{"prompt": f"Q{i}?", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(10)]
    from dpokit.core.config import DataConfig
    from dpokit.data import load_preferences

    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_preferences(DataConfig(source=str(src), eval_fraction=0.2, kind="unpaired"))
    assert data.kind == "unpaired" and len(data.train) == 16 and len(data.eval) == 4
    assert sum(r["label"] for r in data.train) == 8
    train_prompts = {r["prompt"] for r in data.train}
    assert not train_prompts & {r["prompt"] for r in data.eval}
    assert data.report.checks.train.labels.model_dump() == {"desirable": 8, "undesirable": 8}
    assert data.train_locations[0] == data.train_locations[1] == f"{src}:1"


def test_ranked_checks_count_ties_and_duplicates(tmp_path):
    rows = [{"prompt": "Q?", "responses": [" a", " b", " c"], "scores": [2, 2, 1]},
            {"prompt": "Q?", "responses": [" a", " b", " c"], "scores": [2, 2, 1]},
            {"prompt": "R?", "responses": [" x", " x"], "scores": [2, 1]},
            {"prompt": "S?", "responses": [" u", " v"], "scores": [3, 3]}]  # all tied: dropped, says nothing
    data = _load(tmp_path, rows)
    checks = data.report.checks.train
    assert checks.tied_scores.count == 2 and checks.duplicate_rows.count == 1
    assert checks.repeated_responses.count == 1
    assert data.report.train_counts.dropped_by_format["tied_scores"].count == 1


def test_unpaired_rows_cannot_become_pairs(tmp_path):
    with pytest.raises(UserError, match="data.kind: unpaired"):
        _load(tmp_path, [{"prompt": "Q?", "completion": " a", "label": True}], kind="pair")


@pytest.mark.parametrize("row,needles", [
    ({"prompt": "Q?", "responses": [" only"], "scores": [1]}, ["at least 2 responses", "got 1"]),
    ({"prompt": "Q?", "responses": [" a", " b", " c"], "scores": [3, 1]}, ["'scores'", "3 numbers", "got 2 values"]),
    ({"prompt": "Q?", "completion": " a", "label": "yes"}, ["'label'", "boolean", "'yes'"]),
    ({"prompt": "Q?", "completion": " a", "label": 1}, ["'label'", "boolean"]),
])
def test_bad_feedback_rows_name_file_and_line(tmp_path, row, needles):
    good = {"prompt": "Fine?", "responses": [" a", " b"], "scores": [2, 1]} if "responses" in row else \
        {"prompt": "Fine?", "completion": " a", "label": True}
    with pytest.raises(UserError) as err:
        _load(tmp_path, [good, row])
    message = str(err.value)
    assert f"{tmp_path / 'd.jsonl'}:2" in message and "data.on_error: skip" in message
    for needle in needles:
        assert needle in message, (needle, message)


# --- evaluation --------------------------------------------------------------------------------------------------

def test_ranking_metrics_by_hand():
    """beta = 1, base 0. List A, scores (3, 2, 1), rewards (2, 3, 1): ordered pairs (1,2) wrong, (1,3) right,
    (2,3) right -> tau = (2 - 1) / 3. List B, scores (2, 2, 1) (a tie: 2 ordered pairs), rewards (0, 1, -1): both
    right -> tau = 1. Pairwise accuracy 4/5; mean tau (1/3 + 1) / 2; best-vs-worst right in both."""
    from dpokit.eval.likelihood import ranking_metrics

    m = ranking_metrics([[2.0, 3.0, 1.0], [0.0, 1.0, -1.0]], [[0.0] * 3] * 2, [[3, 2, 1], [2, 2, 1]], beta=1.0)
    assert m.n_ordered_pairs == 5 and m.pairwise_accuracy.value == pytest.approx(0.8)
    assert m.kendall_tau.value == pytest.approx((1 / 3 + 1) / 2)
    assert m.best_vs_worst_accuracy.value == 1.0 and m.n_lists == 2


def test_unpaired_metrics_by_hand():
    from dpokit.eval.likelihood import unpaired_metrics

    m = unpaired_metrics([1.0, -2.0, 0.5, 3.0, -1.0], [0.0, 0.0, 1.0, 1.0, 0.0], [True, True, True, False, False],
                         beta=0.5)
    # rewards (0.5, -1, -0.25 | 1, -0.5): desirable raised 1 of 3, undesirable lowered 1 of 2
    assert m.desirable_accuracy.value == pytest.approx(1 / 3)
    assert m.undesirable_accuracy.value == pytest.approx(0.5)
    assert m.balanced_accuracy == pytest.approx((1 / 3 + 0.5) / 2)
    assert m.reward_desirable.value == pytest.approx((0.5 - 1 - 0.25) / 3)


def test_loss_and_data_kind_mismatch_is_one_line_error(cli, tmp_path):
    import yaml

    from conftest import tiny_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tmp_path, train={"loss": "listwise_pl"})))
    res = cli("train", cfg)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "trains on ranked rows, but the data is pair" in res.stderr and "data.kind: ranked" in res.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind,loss", [("ranked", "listwise_pl"), ("unpaired", "kto")])
def test_train_and_eval_feedback_kinds_end_to_end(cli, tmp_path, kind, loss):
    """CPU smoke run: ranked lists / split pairs train (precomputed reference, cached) and evaluate."""
    import yaml

    from conftest import CONFIGS, tiny_config

    source = CONFIGS / "data" / ("tiny_ranked.jsonl" if kind == "ranked" else "tiny_prefs.jsonl")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tmp_path, data={"source": str(source), "kind": kind},
                                              train={"loss": loss, "reference": "precomputed", "max_steps": 36},
                                              eval={"generate": False})))
    res = cli("train", cfg)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["reference_forwards"]["training"] == 0
    section = result["ranking" if kind == "ranked" else "unpaired"]
    assert section is not None
    metric = section["pairwise_accuracy"] if kind == "ranked" else section["desirable_accuracy"]
    assert metric["value"] > 0.6


@pytest.mark.parametrize("source, kind", [("tiny_ranked.jsonl", "ranked"), ("tiny_prefs.jsonl", "unpaired")])
def test_data_inspect_prints_the_report_of_ranked_and_unpaired_rows(capfd, source, kind):
    """docs/feedback-kinds.md runs `dpokit data inspect configs/data/tiny_ranked.jsonl --set kind=ranked`; the printed
    report once assumed pair keys (KeyError: 'duplicate_pairs')."""
    from conftest import CONFIGS, run_main

    res = run_main(capfd, "data", "inspect", CONFIGS / "data" / source, "--set", f"kind={kind}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "duplicate rows" in res.stdout
    assert ("by rank" if kind == "ranked" else "desirable mean") in res.stdout
