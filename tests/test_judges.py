"""Judges against real components: VADER, a tiny sequence classifier built here, a real HTTP chat server on
127.0.0.1, a local HF model, and a user Python function."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dpokit.errors import UserError
from dpokit.eval.judges import build_judge, compare, parse_verdict

PROMPTS = ["How was the sea?", "Tell me about the park."]
GOOD = ["The sea was lovely and wonderful.", "The park is beautiful, I love it."]
BAD = ["The sea was horrible and cold.", "The park is ugly and boring."]


def test_sentiment_judge_pointwise_compare():
    judge = build_judge("sentiment", {})
    res = compare(judge, PROMPTS, GOOD, BAD)
    assert res.outcomes == [1, 1]
    assert all(a > 0 > b for a, b in zip(res.scores_a, res.scores_b, strict=False))
    assert compare(judge, PROMPTS, GOOD, GOOD).outcomes == [0, 0]  # identical answers tie
    # A tie margin wider than the score gap turns wins into ties.
    assert compare(build_judge("sentiment", {"tie_margin": 5.0}), PROMPTS, GOOD, BAD).outcomes == [0, 0]


def test_unknown_judge_and_option_are_user_errors():
    with pytest.raises(UserError, match="unknown judge"):
        build_judge("oracle", {})
    with pytest.raises(UserError, match="unknown option"):
        build_judge("sentiment", {"temperature": 1})


def test_parse_verdict():
    assert parse_verdict("A") == "A" and parse_verdict(" b.") == "B" and parse_verdict("Tie") == "tie"
    assert parse_verdict("**A** is better") == "A"
    for bad in ("", None, "Answer A", "AB", "I cannot decide"):
        assert parse_verdict(bad) is None


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    """A tiny LLaMA sequence classifier (1 label) with dpokit's tiny tokenizer, saved as a folder."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from dpokit.models import build_tiny_tokenizer

    tok = build_tiny_tokenizer("llama")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(cfg)
    out = tmp_path_factory.mktemp("rm") / "tiny-rm"
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def test_reward_model_judge_matches_direct_forward(tiny_classifier):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    judge = build_judge("reward-model", {"model": str(tiny_classifier), "batch_size": 3,
                                         "use_chat_template": False})
    prompts = PROMPTS * 2
    responses = GOOD + ["ok", "a much longer answer about the park that needs several more tokens to say"]
    scores = judge.score(prompts, responses)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier).eval()
    tok = AutoTokenizer.from_pretrained(tiny_classifier)
    with torch.no_grad():  # one at a time, no padding: the reference the batched judge must match
        direct = [model(**tok(p + r, return_tensors="pt")).logits[0, 0].item() for p, r in zip(prompts, responses, strict=False)]
    assert scores == pytest.approx(direct, abs=1e-4)
    res = compare(judge, prompts, responses, list(reversed(responses)))
    assert res.outcomes == [(x > y) - (x < y) for x, y in zip(res.scores_a, res.scores_b, strict=False)]


def test_reward_model_judge_needs_model():
    with pytest.raises(UserError, match="needs a model"):
        build_judge("reward-model", {})
    with pytest.raises(UserError, match="cannot load reward model"):
        build_judge("reward-model", {"model": "/nonexistent/rm"})


def test_python_judge(tmp_path):
    (tmp_path / "myjudge.py").write_text("def score(prompt, response):\n    return len(response.split())\n")
    judge = build_judge("python", {"function": f"{tmp_path / 'myjudge.py'}:score"})
    assert judge.score(PROMPTS, ["one two", "one"]) == [2.0, 1.0]
    assert compare(judge, PROMPTS, ["a b c", "x"], ["a", "y"]).outcomes == [1, 0]
    with pytest.raises(UserError, match="no function"):
        build_judge("python", {"function": f"{tmp_path / 'myjudge.py'}:nope"})
    with pytest.raises(UserError, match="module:function"):
        build_judge("python", {"function": "justaname"})


class _ChatServer:
    """A real OpenAI-compatible /v1/chat/completions server on 127.0.0.1. `answer(user_message) -> str`."""

    def __init__(self, answer):
        calls = self.calls = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                calls.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                if self.path != "/v1/chat/completions":
                    self.send_response(404)
                    self.end_headers()
                    return
                content = answer(body["messages"][-1]["content"])
                data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(data.encode())

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _sensible(message: str) -> str:
    """Prefers the answer with a positive word; says tie when both or neither have one."""
    a = message.split("Answer A:\n")[1].split("\n\nAnswer B:")[0]
    b = message.split("Answer B:\n")[1].split("\n\nWhich")[0]
    pos_a, pos_b = ("lovely" in a or "beautiful" in a), ("lovely" in b or "beautiful" in b)
    return "tie" if pos_a == pos_b else ("A" if pos_a else "B")


def test_llm_judge_http_both_orders_and_api_key(monkeypatch):
    server = _ChatServer(_sensible)
    monkeypatch.setenv("JUDGE_KEY_FOR_TEST", "sk-secret-123")
    try:
        judge = build_judge("llm", {"base_url": server.url, "model": "judge-model", "api_key_env": "JUDGE_KEY_FOR_TEST"})
        outcomes = judge.compare(PROMPTS + ["x"], GOOD + ["same"], BAD + ["same"])
    finally:
        server.close()
    assert outcomes == [1, 1, 0]
    assert len(server.calls) == 6  # every pair asked in both orders
    assert {c["path"] for c in server.calls} == {"/v1/chat/completions"}
    assert all(c["auth"] == "Bearer sk-secret-123" and c["body"]["model"] == "judge-model" for c in server.calls)
    # The swapped order really swaps: the good answer appears as A once and as B once.
    first, swapped = server.calls[0]["body"]["messages"][0]["content"], server.calls[3]["body"]["messages"][0]["content"]
    assert first.index(GOOD[0]) < first.index(BAD[0]) and swapped.index(BAD[0]) < swapped.index(GOOD[0])
    assert "sk-secret-123" not in json.dumps(judge.last_details)
    assert judge.last_details["position_consistent_pairs"] == 3


def test_llm_judge_always_A_position_bias_cancels():
    """A judge that always answers 'A' prefers whichever answer is shown first; asking both orders turns every
    such pair into a tie instead of a win for the model shown first."""
    server = _ChatServer(lambda message: "A")
    try:
        judge = build_judge("llm", {"base_url": server.url, "model": "m"})
        res = compare(judge, PROMPTS, GOOD, BAD)
    finally:
        server.close()
    assert res.outcomes == [0, 0]
    assert res.details["position_inconsistent_pairs"] == 2 and res.details["first_position_picked"] == 4
    assert res.scores_a is None  # pairwise judges give no pointwise scores


def test_llm_judge_unparseable_counted_not_guessed():
    replies = iter(["A", "I think the first", "B", "B", "tie", "tie"])
    server = _ChatServer(lambda message: next(replies))
    try:
        judge = build_judge("llm", {"base_url": server.url, "model": "m"})
        outcomes = judge.compare(["p1", "p2", "p3"], ["a1", "a2", "a3"], ["b1", "b2", "b3"])
    finally:
        server.close()
    # Pair 1: A then B (a first, a second) -> consistent win for a. Pair 2: unparseable, then 'tie' -> None.
    # Pair 3: B then tie -> loss + tie -> loss.
    assert outcomes == [1, None, -1]
    assert judge.last_details["unparseable_answers"] == 1


def test_llm_judge_http_errors_are_user_errors(monkeypatch):
    monkeypatch.delenv("NOT_SET_KEY_X", raising=False)
    with pytest.raises(UserError, match="NOT_SET_KEY_X is not set"):
        build_judge("llm", {"base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": "NOT_SET_KEY_X"})
    server = _ChatServer(lambda m: "A")
    port = server.server.server_port
    server.close()
    judge = build_judge("llm", {"base_url": f"http://127.0.0.1:{port}/v1", "model": "m", "timeout": 5})
    with pytest.raises(UserError, match="cannot reach"):
        judge.compare(["p"], ["a"], ["b"])


def test_llm_judge_local_hf_model():
    """A local HF chat model (the tiny LLaMA alias) really generates; its (random) replies are parsed or counted
    as unparseable, and every pair is asked in both orders."""
    judge = build_judge("llm", {"model": "dpokit-tiny-llama", "max_tokens": 4})
    res = compare(judge, PROMPTS, GOOD, BAD)
    assert len(res.outcomes) == 2
    details = res.details
    assert details["answers"] == 4
    n_parsed = details["first_position_picked"] + details["second_position_picked"]
    assert n_parsed + details["unparseable_answers"] <= 4
    assert sum(o is None for o in res.outcomes) <= details["unparseable_answers"]
