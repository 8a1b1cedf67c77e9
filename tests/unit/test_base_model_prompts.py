"""A model whose tokenizer has no chat template (a base model) in the demo's core check and the soak: the raw
prompt is used (demo), the chat endpoint is left out (soak), and the report says so; nothing fails inside the
tokenizer. ``bench e2e``'s side is in ``test_bench_e2e_parts.py``. No real model: fake tokenizers and servers."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
import torch

from nanospec_vllm.tools.bench import soak

V, H = 40, 8


class _BaseTokenizer:
    """No chat template; ``apply_chat_template`` fails as Hugging Face's does."""

    chat_template = None
    all_special_ids = (0,)

    def apply_chat_template(self, *a, **k):
        raise ValueError("Cannot use chat template functions because tokenizer.chat_template is not set")

    def encode(self, text, add_special_tokens=True):
        return [1 + (ord(c) % (V - 1)) for c in text]

    def decode(self, ids):
        return " ".join(str(int(i)) for i in ids)


class _TinyLM(torch.nn.Module):
    """Hidden state = the last token's embedding; logits = hidden @ W^T (what ``core_check`` reads)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.randn(V, H, generator=g)
        self.head = torch.nn.Linear(H, V, bias=False)
        self.head.weight.data = torch.randn(V, H, generator=g)

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.head

    def forward(self, ids, output_hidden_states=True):
        h = self.emb[ids]
        return NS(hidden_states=(h,), logits=h @ self.head.weight.T)


def test_demo_core_check_on_a_base_model(monkeypatch, capsys):
    import transformers

    from nanospec_vllm.tools import demo

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: _BaseTokenizer())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: _TinyLM())
    assert demo.core_check(Path("/models/base"), "hello", steps=6, capacity=32, k=2) is True
    out = capsys.readouterr().out
    assert "prompt (raw: the tokenizer has no chat template): 'hello'" in out


class _Response:
    def __init__(self, status: int, body: dict | None = None, text: str = "") -> None:
        self.status_code, self._body, self.text = status, body or {}, text

    def json(self) -> dict:
        return self._body

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            raise RuntimeError(f"HTTP {self.status_code}: {self.text}")


def _server(chat: bool, calls: list):
    """``requests.post`` of a vLLM server whose model has (or has no) chat template."""
    def post(url, json, timeout):
        calls.append(json)
        if "messages" in json and not chat:
            return _Response(400, text='{"error": {"message": "As of transformers v4.44, default chat template is '
                                       'no longer allowed, so you must provide a chat template if the tokenizer '
                                       'does not define one."}}')
        n = len(json.get("prompt") or json["messages"][0]["content"]) + (5 if "messages" in json else 0)
        return _Response(200, {"count": n})
    return post


@pytest.mark.parametrize("chat", [True, False])
def test_soak_leaves_the_chat_endpoint_out_without_a_chat_template(monkeypatch, chat: bool):
    import requests

    calls: list = []
    monkeypatch.setattr(requests, "post", _server(chat, calls))
    assert soak.chat_template_available("http://x", "m") is chat
    calls.clear()
    # the chat form is 5 tokens longer: measured only where there is one
    assert soak.fitting_prompts("http://x", "m", ["ab", "abcd", "abcdefgh"], limit=7, chat=chat) == (
        ["ab"] if chat else ["ab", "abcd"])
    assert any("messages" in c for c in calls) is chat  # no chat request to a server that cannot render one
    # only completions are planned
    endpoints = soak.ENDPOINTS if chat else ("completions",)
    rng = random.Random(0)
    drawn = {soak.plan_request(rng, 5, endpoints).endpoint for _ in range(200)}
    assert drawn == set(endpoints)


def test_soak_raises_other_tokenize_errors(monkeypatch):
    import requests

    monkeypatch.setattr(requests, "post", lambda url, json, timeout: _Response(500, text="boom"))
    with pytest.raises(RuntimeError, match="500"):
        soak.chat_template_available("http://x", "m")
