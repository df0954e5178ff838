"""reference: precomputed: a beta sweep's second run does zero reference forwards, and its metrics equal a run that
computes the reference log-probs itself (issue 4 must-show 2)."""

import json

import pytest

from conftest import tiny_config
from dpokit.core.config import config_from_dict
from dpokit.core.io import read_jsonl

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected", "grad_norm")


def _run(tmp_path, name, monkeypatch, cache, **train):
    from dpokit.train.trainer import run_training

    monkeypatch.setenv("DPOKIT_CACHE", str(cache))
    base = {"max_steps": 4, "reference": "precomputed", "seed": 3}
    cfg = config_from_dict(tiny_config(tmp_path, train={**base, **train}, output={"dir": str(tmp_path / name)},
                                       eval={"enabled": False}))
    run_dir = run_training(cfg).run_dir
    summary = json.loads((run_dir / "train_summary.json").read_text())
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    return summary, rows


def _models_dir(monkeypatch, tmp_path):
    """Keep the tiny model build in the session cache: link it into each test cache."""
    import os

    from dpokit.core.models import cache_dir

    shared = cache_dir() / "models"
    for cache in ("cache_a", "cache_b"):
        (tmp_path / cache).mkdir()
        os.symlink(shared, tmp_path / cache / "models")


@pytest.mark.slow
def test_beta_sweep_reuses_reference_logps(tmp_path, monkeypatch):
    from dpokit.core.models import resolve_model_path

    resolve_model_path("dpokit-tiny-llama")  # build once in the shared cache
    _models_dir(monkeypatch, tmp_path)
    first, _ = _run(tmp_path, "beta01", monkeypatch, tmp_path / "cache_a", beta=0.1)
    assert first["reference_cache"]["cache"] == "miss" and first["reference_forwards"]["precompute"] > 0
    assert first["reference_forwards"]["training"] == 0  # no reference model during training

    second, rows = _run(tmp_path, "beta02", monkeypatch, tmp_path / "cache_a", beta=0.2)
    assert second["reference_cache"]["cache"] == "hit"
    assert second["reference_forwards"] == {"precompute": 0, "training": 0}
    assert second["step0_check"]["policy_equals_reference"]

    # The same run with an empty cache computes the reference itself: identical metrics.
    fresh, fresh_rows = _run(tmp_path, "beta02_fresh", monkeypatch, tmp_path / "cache_b", beta=0.2)
    assert fresh["reference_cache"]["cache"] == "miss"
    assert len(rows) == len(fresh_rows) == 4
    for got, want in zip(rows, fresh_rows, strict=True):
        for key in METRICS:
            assert got[key] == pytest.approx(want[key], abs=1e-6, rel=0), key

    # And a live reference model (forwards every step) agrees up to padding-dependent float noise.
    live, live_rows = _run(tmp_path, "beta02_live", monkeypatch, tmp_path / "cache_b", beta=0.2, reference="model")
    assert live["reference_forwards"]["training"] == 4
    for got, want in zip(rows, live_rows, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)


def test_cache_key_changes_with_its_parts():
    from dpokit.train.reference import cache_key

    base = cache_key("m", "d", "tpl", 64)
    assert len({base, cache_key("m2", "d", "tpl", 64), cache_key("m", "d2", "tpl", 64),
                cache_key("m", "d", "other", 64), cache_key("m", "d", "tpl", 128)}) == 5


def _pairs(n, vocab, seed):
    import random

    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(3, vocab) for _ in range(k)]  # noqa: E731
    return [{"prompt_ids": ids(rng.randint(1, 6)), "chosen_ids": ids(rng.randint(1, 5)),
             "rejected_ids": ids(rng.randint(1, 5))} for _ in range(n)]


def test_data_fingerprint_covers_every_field_and_the_split():
    from dpokit.core.scoring import pairs_fingerprint

    pairs = _pairs(4, 100, seed=0)
    base = pairs_fingerprint(pairs[:3], pairs[3:])
    changed = set()
    for field in ("prompt_ids", "chosen_ids", "rejected_ids"):
        edited = [dict(p) for p in pairs]
        edited[1][field] = edited[1][field] + [7]
        changed.add(pairs_fingerprint(edited[:3], edited[3:]))
    assert len(changed) == 3 and base not in changed
    assert pairs_fingerprint(pairs[:2], pairs[2:]) != base  # values are stored by position within each split


def _precompute(model, tok, train, evals, **kw):
    from dpokit.train.reference import precompute

    kw = {"pad_id": tok.pad_token_id, "template": None, "max_length": 64, "batch_size": 2, **kw}
    info = precompute(model, train, evals, **kw)
    return info, [v for p in train + evals for v in (p["ref_chosen_logps"], p["ref_rejected_logps"])]


def test_precompute_cache_hit_and_refresh(tiny_llama, tmp_path, monkeypatch):
    model, tok = tiny_llama
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    train, evals = _pairs(5, model.config.vocab_size, seed=1), _pairs(2, model.config.vocab_size, seed=2)
    first, values = _precompute(model, tok, train, evals)
    assert first["cache"] == "miss" and first["forwards"] == 4  # 7 pairs in batches of 2
    again, cached = _precompute(model, tok, train, evals)
    assert again == {"cache": "hit", "forwards": 0, "path": first["path"]} and cached == values
    refreshed, recomputed = _precompute(model, tok, train, evals, refresh=True)
    assert refreshed["cache"] == "miss" and refreshed["forwards"] == 4
    assert recomputed == pytest.approx(values, abs=1e-5)


def test_precompute_split_over_processes_reassembles_in_pair_order(tiny_llama, tmp_path, monkeypatch):
    """Two ranks each score every second pair; the gathered values land on the right pairs (rank 1 simulated here:
    the real two-process run is the slow test in test_distributed.py)."""
    from dpokit.train import reference

    model, tok = tiny_llama
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    train, evals = _pairs(5, model.config.vocab_size, seed=3), _pairs(2, model.config.vocab_size, seed=4)
    _, alone = _precompute(model, tok, [dict(p) for p in train], [dict(p) for p in evals], refresh=True)
    rank1 = reference.compute_logps(model, (train + evals)[1::2], tok.pad_token_id, 2)

    def fake_all_gather(obj, world):  # what rank 0 receives from both ranks
        assert world == 2
        return [obj, obj] if isinstance(obj, bool) else [obj, rank1]

    monkeypatch.setattr(reference, "_all_gather", fake_all_gather)
    info, split = _precompute(model, tok, train, evals, refresh=True, rank=0, world=2)
    assert info["processes"] == 2 and info["forwards"] == 2  # rank 0 scored pairs 0, 2, 4, 6
    assert split == pytest.approx(alone, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [True, False])
def test_eval_reuses_the_held_out_reference_logps_and_equals_recomputing_them(tmp_path, monkeypatch, lora):
    """With reference: precomputed, training already scored the held-out pairs under the base model: evaluation
    takes those values (one spot-check batch instead of a forward over every held-out pair) and its preference
    metrics equal an evaluation that recomputes them (the run folder's copy deleted). The values are read from the
    run folder (data/reference_eval_logps.json), never from the shared cache: deleting the cache changes nothing."""
    import os

    import dpokit.eval
    from dpokit.core.models import resolve_model_path
    from dpokit.eval import evaluate_run
    from dpokit.train.trainer import run_training

    resolve_model_path("dpokit-tiny-llama")  # build once in the shared cache
    _models_dir(monkeypatch, tmp_path)
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache_a"))
    train = {"max_steps": 3, "reference": "precomputed", "seed": 3}
    if lora:
        train["lora"] = {"r": 4, "alpha": 8}
    cfg = config_from_dict(tiny_config(tmp_path, train=train, eval={"enabled": False, "generate": False,
                                                                     "batch_size": 4}))
    run_dir = run_training(cfg).run_dir
    cache_file = json.loads((run_dir / "train_summary.json").read_text())["reference_cache"]["path"]
    held_out = run_dir / "data" / "reference_eval_logps.json"
    n_eval = len(json.loads(held_out.read_text())["chosen"])
    assert n_eval > 4  # more than the spot-check batch
    assert json.loads(held_out.read_text())["chosen"] == [c for c, _ in json.loads(open(cache_file).read())["eval"]]
    os.unlink(cache_file)  # evaluation reads only the run folder

    rows_scored = []
    real_pair_logps = dpokit.eval.pair_logps

    def counting_pair_logps(model, encoded, *args, **kwargs):
        rows_scored.append(len(encoded))
        return real_pair_logps(model, encoded, *args, **kwargs)

    monkeypatch.setattr(dpokit.eval, "pair_logps", counting_pair_logps)
    reused = evaluate_run(run_dir).preference.model_dump()
    assert sorted(rows_scored) == [4, n_eval]  # the spot-check batch, then the tuned model
    # Values of another reference (shifted by 0.5 nats) fail the spot check: everything is recomputed.
    stored = json.loads(held_out.read_text())
    stored["chosen"] = [c + 0.5 for c in stored["chosen"]]
    stored["rejected"] = [r + 0.5 for r in stored["rejected"]]
    held_out.write_text(json.dumps(stored))
    rows_scored.clear()
    guarded = evaluate_run(run_dir).preference.model_dump()
    assert sorted(rows_scored) == [4, n_eval, n_eval]
    rows_scored.clear()
    os.unlink(held_out)
    recomputed = evaluate_run(run_dir).preference.model_dump()
    assert rows_scored == [n_eval, n_eval]
    assert json.dumps(guarded, sort_keys=True) == json.dumps(recomputed, sort_keys=True)
    assert json.dumps(reused, sort_keys=True) == json.dumps(recomputed, sort_keys=True)
