"""Judges against real components: VADER, a tiny sequence classifier built here, a real HTTP chat server on
127.0.0.1, a local HF model, and a user Python function."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dpokit.core.errors import UserError
from dpokit.core.judges import build_judge, compare, parse_verdict

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

    from dpokit.core.models import build_tiny_tokenizer

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


# --- check_judge: static checks, no model loaded ------------------------------------------------------------------

from dpokit.core.judges import JUDGES, JudgeOptions, check_judge  # noqa: E402


def _one(problems, *needles):
    """Exactly one problem, naming every needle; like every problem, it names its key, then says how to fix it
    after a '; '."""
    assert len(problems) == 1, problems
    assert problems[0].split(":")[0].startswith(("eval.judge", "pairs.judge")), problems[0]
    assert "; " in problems[0], problems[0]
    for needle in needles:
        assert needle in problems[0], (needle, problems[0])
    return problems[0]


@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to load model weights fails the test: check_judge must stay static."""
    import transformers

    import dpokit.core.models as models

    def boom(*args, **kwargs):
        raise AssertionError("check_judge loaded a model")

    for cls in ("AutoModelForSequenceClassification", "AutoModelForCausalLM", "AutoTokenizer"):
        monkeypatch.setattr(getattr(transformers, cls), "from_pretrained", boom)
    monkeypatch.setattr(models, "load_model", boom)
    monkeypatch.setattr(models, "load_tokenizer", boom)


def test_check_judge_valid_configs_are_clean(tmp_path, monkeypatch, no_weights):
    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "config.json").write_text("{}")  # a folder that looks right; no weights at all: nothing is loaded
    (tmp_path / "j.py").write_text("def score(prompt, response):\n    return 1.0\n")
    monkeypatch.setenv("JUDGE_KEY_FOR_CHECK", "sk-secret-999")
    assert check_judge("sentiment", None) == []
    assert check_judge("sentiment", {"tie_margin": 0.05}) == []
    assert check_judge("reward-model", {"model": str(rm), "batch_size": 2, "max_length": 64, "label": 0,
                                        "use_chat_template": False, "tie_margin": 0}) == []
    assert check_judge("reward-model", {"model": "OpenAssistant/reward-model-deberta-v3-large-v2"}) == []  # hub id
    assert check_judge("llm", {"model": "dpokit-tiny-llama", "max_tokens": 4, "batch_size": 2}) == []
    assert check_judge("llm", {"base_url": "https://api.example.com/v1", "model": "m", "timeout": 2.5,
                               "api_key_env": "JUDGE_KEY_FOR_CHECK", "template": "{prompt} {a} {b}"}) == []
    assert check_judge("python", {"function": f"{tmp_path / 'j.py'}:score", "tie_margin": 0.1}) == []
    assert check_judge("python", {"function": "os.path:join"}) == []
    # One record per judge: its name, its options model (every option with a default and a help string), its builder.
    for name, kind in JUDGES.items():
        assert kind.name == name and issubclass(kind.options, JudgeOptions) and callable(kind.build)
        assert all(f.description for f in kind.options.model_fields.values()), name


def test_check_judge_unknown_judge_suggests_the_closest():
    line = _one(check_judge("sentimnt", {}), "eval.judge:", "unknown judge 'sentimnt'",
                "sentiment, reward-model, llm, python", "did you mean 'sentiment'?")
    assert line.index(";") < line.index("choose one of")
    _one(check_judge("oracle", {}, "pairs"), "pairs.judge:", "'oracle'")
    assert "did you mean" not in check_judge("oracle", {})[0]


def test_check_judge_unknown_option_names_key_and_valid_ones():
    _one(check_judge("sentiment", {"temperature": 1}), "eval.judge_options", "temperature", "valid: tie_margin")
    _one(check_judge("llm", {"model": "m", "base_url": "http://x/v1", "temprature": 0}, "pairs"),
         "pairs.judge_options", "temprature", "valid: model")
    _one(check_judge("reward-model", {"model": "org/rm", "bach_size": 2}), "bach_size", "did you mean 'batch_size'?")


@pytest.mark.parametrize("name,option,value", [
    ("sentiment", "tie_margin", -0.1), ("sentiment", "tie_margin", "big"), ("reward-model", "batch_size", 0),
    ("reward-model", "batch_size", "many"), ("reward-model", "max_length", 2.5), ("reward-model", "max_length", True),
    ("llm", "max_tokens", -1), ("llm", "timeout", 0), ("llm", "timeout", "soon"), ("llm", "batch_size", 1.5),
    ("python", "tie_margin", float("nan")),
])
def test_check_judge_numbers_need_the_right_type_and_sign(tmp_path, name, option, value):
    base = {"reward-model": {"model": "org/rm"}, "llm": {"model": "m", "base_url": "http://127.0.0.1:9/v1"},
            "python": {"function": "os.path:join"}, "sentiment": {}}[name]
    line = _one(check_judge(name, {**base, option: value}), f"eval.judge_options.{option}: must be", "--set")
    assert ("an integer" if option in ("batch_size", "max_length", "max_tokens") else "a number") in line


def test_check_judge_reward_model(tmp_path, no_weights):
    _one(check_judge("reward-model", {}), "eval.judge_options.model", "needs a model", "--set")
    _one(check_judge("reward-model", {"model": str(tmp_path / "no-rm")}), "eval.judge_options.model",
         "cannot load reward model", "folder not found")
    _one(check_judge("reward-model", {"model": "./no-such-rm"}, "pairs"), "pairs.judge_options.model",
         "folder not found")
    (tmp_path / "empty-rm").mkdir()
    _one(check_judge("reward-model", {"model": str(tmp_path / "empty-rm")}), "no config.json")
    (tmp_path / "file-rm").write_text("x")
    _one(check_judge("reward-model", {"model": str(tmp_path / "file-rm")}), "not a folder")
    _one(check_judge("reward-model", {"model": "org/rm", "use_chat_template": "yes"}), "use_chat_template")
    _one(check_judge("reward-model", {"model": "org/rm", "label": "good"}), "eval.judge_options.label")


def test_check_judge_reward_model_folder_without_weights_loads_nothing(tmp_path, no_weights):
    """A folder with config.json passes the static check even with no weights in it: proof nothing was loaded
    (loading would fail), and the `no_weights` fixture fails the test on any from_pretrained call."""
    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert check_judge("reward-model", {"model": str(rm)}) == []


def test_check_judge_llm(tmp_path, monkeypatch, no_weights):
    _one(check_judge("llm", {}), "eval.judge_options.model", "llm judge needs a model")
    _one(check_judge("llm", {"model": "m", "base_url": "http://h/v1", "template": "Which? {a} or {b}"}),
         "eval.judge_options.template", "{prompt}")
    _one(check_judge("llm", {"model": "m", "base_url": "127.0.0.1:8000/v1"}), "eval.judge_options.base_url",
         "http:// or https://")
    _one(check_judge("llm", {"model": "m", "base_url": "ftp://h/v1"}, "pairs"), "pairs.judge_options.base_url")
    _one(check_judge("llm", {"model": str(tmp_path / "no-judge-model")}), "eval.judge_options.model", "not found")
    _one(check_judge("llm", {"model": "./no-judge-model"}), "'./no-judge-model'", "not found")
    # With base_url the model is the server's name for it, not a path.
    assert check_judge("llm", {"model": "./served-name", "base_url": "http://h/v1"}) == []
    monkeypatch.delenv("NOT_SET_KEY_Y", raising=False)
    _one(check_judge("llm", {"model": "m", "base_url": "http://h/v1", "api_key_env": "NOT_SET_KEY_Y"}),
         "eval.judge_options.api_key_env", "NOT_SET_KEY_Y is not set", "export NOT_SET_KEY_Y=")
    # Several problems at once: all reported.
    problems = check_judge("llm", {"base_url": "localhost", "template": "{a}", "timeout": -1, "colour": 1})
    assert len(problems) == 5, problems
    assert all(p.startswith("eval.judge_options") for p in problems)


@pytest.mark.parametrize("value", ["sk-proj-AbCdEf0123456789xyz", "hf_AbCdEfGhIjKlMnOpQrStUv12", "sk_live_abc123",
                                   "Bearer abcdef", "x9F3kLmN0pQrS7tUvW2yZ4aB"])
def test_check_judge_api_key_env_given_the_key_itself_is_not_echoed(value, no_weights):
    line = _one(check_judge("llm", {"model": "m", "base_url": "https://h/v1", "api_key_env": value}),
                "eval.judge_options.api_key_env", "looks like an API key itself", "OPENAI_API_KEY")
    assert value not in line and value[:8] not in line
    with pytest.raises(UserError) as err:
        build_judge("llm", {"model": "m", "base_url": "https://h/v1", "api_key_env": value})
    assert value not in str(err.value)


def test_check_judge_api_key_env_invalid_name_is_not_echoed():
    line = _one(check_judge("llm", {"model": "m", "base_url": "https://h/v1", "api_key_env": "MY-KEY.2"}),
                "eval.judge_options.api_key_env", "not a valid environment variable name")
    assert "MY-KEY.2" not in line


def test_check_judge_python(tmp_path):
    _one(check_judge("python", {}), "eval.judge_options.function", "module:function")
    _one(check_judge("python", {"function": "justaname"}), "eval.judge_options.function", "module:function")
    _one(check_judge("python", {"function": f"{tmp_path / 'missing.py'}:score"}, "pairs"),
         "pairs.judge_options.function", "missing.py", "not found")
    (tmp_path / "judge_a.py").write_text("def other(prompt, response):\n    return 0.0\n")
    _one(check_judge("python", {"function": f"{tmp_path / 'judge_a.py'}:score"}), "eval.judge_options.function",
         "no function 'score'")
    (tmp_path / "judge_b.py").write_text("score = 3\n")
    _one(check_judge("python", {"function": f"{tmp_path / 'judge_b.py'}:score"}), "no function 'score'")
    (tmp_path / "judge_c.py").write_text("def score(prompt, response)\n    return 1\n")
    _one(check_judge("python", {"function": f"{tmp_path / 'judge_c.py'}:score"}), "SyntaxError", "judge_c.py")
    (tmp_path / "judge_d.py").write_text("import no_such_module_for_dpokit_tests\n")
    _one(check_judge("python", {"function": f"{tmp_path / 'judge_d.py'}:score"}), "cannot import")
    _one(check_judge("python", {"function": "no_such_module_for_dpokit_tests:score"}), "cannot import",
         "PYTHONPATH")


def test_build_judge_raises_exactly_the_check_judge_problems(tmp_path):
    cases = [("sentimnt", {}), ("sentiment", {"temperature": 1, "tie_margin": -1}), ("reward-model", {}),
             ("reward-model", {"model": str(tmp_path / "nope")}), ("llm", {"base_url": "localhost"}),
             ("python", {"function": f"{tmp_path / 'nope.py'}:f"})]
    for name, options in cases:
        problems = check_judge(name, options)
        assert problems
        with pytest.raises(UserError) as err:
            build_judge(name, options)
        assert str(err.value) == "; ".join(problems)
    # The pairs section names its own keys when building too.
    with pytest.raises(UserError, match=r"^pairs\.judge_options\.model"):
        build_judge("reward-model", {}, key="pairs")


def test_python_judge_file_runs_once_for_check_and_build(tmp_path):
    """check_judge imports the user's file and build_judge uses it again: the file's top level runs once."""
    log = tmp_path / "runs.log"
    (tmp_path / "counted.py").write_text(
        f"with open({str(log)!r}, 'a') as fh:\n    fh.write('x')\n\ndef score(prompt, response):\n    return 1.0\n")
    spec = f"{tmp_path / 'counted.py'}:score"
    assert check_judge("python", {"function": spec}) == []
    judge = build_judge("python", {"function": spec})
    assert judge.score(["p"], ["r"]) == [1.0]
    assert log.read_text() == "x"


def test_check_judge_python_file_writes_no_bytecode(tmp_path, monkeypatch):
    """Checking a config writes nothing: importing the user's judge file leaves no __pycache__ beside it, even
    where Python would normally write one."""
    import sys

    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    (tmp_path / "judge_pyc.py").write_text("def score(prompt, response):\n    return 1.0\n")
    assert check_judge("python", {"function": f"{tmp_path / 'judge_pyc.py'}:score"}) == []
    assert sys.dont_write_bytecode is False  # restored
    assert sorted(p.name for p in tmp_path.iterdir()) == ["judge_pyc.py"]


def test_every_problem_names_its_key_and_the_fix(tmp_path):
    bad = [("sentimnt", {}), ("sentiment", "tie_margin=1"), ("sentiment", {"tie_margin": -1, "x": 1}),
           ("reward-model", {"model": 3, "label": "good", "use_chat_template": "yes", "batch_size": 0}),
           ("llm", {"model": ["m"], "base_url": 5, "api_key_env": "", "template": 7, "timeout": "soon"}),
           ("llm", {"model": "m", "base_url": "http://h", "api_key_env": "1BAD"}),
           ("python", {"function": 42}), ("python", {"function": "nocolon"})]
    for key in ("eval", "pairs"):
        problems = [p for name, options in bad for p in check_judge(name, options, key)]
        assert len(problems) >= 14, problems
        for problem in problems:
            assert problem.startswith(f"{key}.judge"), problem
            assert "; " in problem, problem
