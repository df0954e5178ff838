"""Model resolution: the tiny aliases, pad-token handling, and the bundled SmolLM2 (converted once, then cached)."""

import os

import pytest
import torch

from dpokit.core.errors import UserError
from dpokit.core.models import cache_dir, load_model, load_tokenizer, resolve_model_path


def test_tiny_aliases_build_deterministically(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path))
    first = load_model("dpokit-tiny-llama", dtype="float32")
    path = resolve_model_path("dpokit-tiny-llama")
    assert path.startswith(str(tmp_path)) and os.path.isfile(os.path.join(path, "model.safetensors"))
    import shutil

    shutil.rmtree(path)
    second = load_model("dpokit-tiny-llama", dtype="float32")
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(a, b), name


def test_gpt2_tokenizer_without_pad_gets_eos():
    tok = load_tokenizer("dpokit-tiny-gpt2")
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert not tok.chat_template


def test_llama_tokenizer_adds_bos_and_has_chat_template():
    tok = load_tokenizer("dpokit-tiny-llama")
    assert tok("hello")["input_ids"][0] == tok.bos_token_id
    assert tok.chat_template


def test_missing_local_folder_is_user_error():
    with pytest.raises(UserError, match="model.name_or_path"):
        load_model("./no/such/folder")


@pytest.mark.slow  # converts SmolLM2 from the GGUF (about 40 s); the fast suite uses the tiny models
def test_smollm2_answers_and_second_load_uses_cache():
    """The bundled GGUF converts once to a safetensors folder; a chat prompt gets a coherent answer."""
    from dpokit.core.sampling import generate

    path = resolve_model_path("smollm2-135m-instruct")
    assert path == str(cache_dir() / "models" / "smollm2-135m-instruct")
    assert os.path.isfile(os.path.join(path, "model.safetensors"))
    stamp = os.path.getmtime(os.path.join(path, "model.safetensors"))
    model = load_model("smollm2-135m-instruct", dtype="float32")
    tok = load_tokenizer("smollm2-135m-instruct")
    # The second resolution returns the same folder without rewriting it.
    assert resolve_model_path("smollm2-135m-instruct") == path
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == stamp
    answer = generate(model, tok, [[{"role": "user", "content": "What is the capital of France?"}]],
                      temperature=0, max_new_tokens=16)[0][0]
    assert "Paris" in answer
