"""``bench soak``'s clients: what a request is (:class:`Plan`), how one is drawn (:func:`plan_request`), sent and
read back (:class:`Client`, :class:`Result`), and the server probes made before driving (chat template, prompt
lengths). Re-exported by :mod:`.soak`."""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from typing import Any

MAX_TOKENS = (8, 32, 96, 200)
KINDS = ("complete", "stream", "disconnect", "abort")
KIND_WEIGHTS = (0.45, 0.25, 0.15, 0.15)
ENDPOINTS = ("completions", "chat")


@dataclass(frozen=True)
class Plan:
    """One request as the client means to send it."""

    kind: str  # complete | stream | disconnect | abort
    endpoint: str  # completions | chat
    prompt: int  # index into the prompt pool
    max_tokens: int
    ignore_eos: bool
    nanospec: bool
    temperature: float = 0.0
    seed: int | None = None
    disconnect_after: int = 0  # chunks read before closing (disconnect)
    timeout_s: float = 0.0  # client read timeout (abort)

    @property
    def key(self) -> tuple[str, int, int, bool]:
        """What makes two greedy requests' outputs comparable."""
        return (self.endpoint, self.prompt, self.max_tokens, self.ignore_eos)

    @property
    def stream(self) -> bool:
        return self.kind in ("stream", "disconnect")


@dataclass
class Result:
    """What came back. ``status``: ok | disconnect | abort | http_<code> | error."""

    plan: Plan
    status: str
    text: str = ""
    tokens: int = 0
    seconds: float = 0.0
    detail: str = ""
    phase: str = "drive"  # warmup | drive | reference


def plan_request(rng: random.Random, n_prompts: int, endpoints: tuple[str, ...] = ENDPOINTS) -> Plan:
    """Draw one request (see the module docstring for the mix) for one of ``endpoints``."""
    kind = rng.choices(KINDS, KIND_WEIGHTS)[0]
    endpoint = rng.choice(endpoints)
    prompt = rng.randrange(n_prompts)
    nanospec = rng.random() < 0.5
    if kind in ("disconnect", "abort"):
        return Plan(kind, endpoint, prompt, max(MAX_TOKENS), True, nanospec,
                    disconnect_after=rng.randint(1, 12) if kind == "disconnect" else 0,
                    timeout_s=round(rng.uniform(0.5, 4.0), 2) if kind == "abort" else 0.0)
    sampled = rng.random() < 0.10
    return Plan(kind, endpoint, prompt, rng.choice(MAX_TOKENS), rng.random() < 0.3, nanospec,
                temperature=0.8 if sampled else 0.0, seed=rng.randrange(2**31) if sampled else None)


# ------------------------------------------------------------------------------------------ client


class Client:
    """Sends :class:`Plan` s to one server. Thread-safe (no shared session: one connection per request)."""

    def __init__(self, base: str, model: str, prompts: list[str], request_timeout: float) -> None:
        self.base, self.model, self.prompts, self.request_timeout = base, model, prompts, request_timeout

    def body(self, p: Plan) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": p.max_tokens, "temperature": p.temperature,
                                "ignore_eos": p.ignore_eos, "vllm_xargs": {"nanospec": p.nanospec}}
        if p.seed is not None:
            body["seed"] = p.seed
        if p.stream:
            body["stream"] = True
        if p.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": self.prompts[p.prompt]}]
            return "/v1/chat/completions", body
        body["prompt"] = self.prompts[p.prompt]
        return "/v1/completions", body

    def send(self, p: Plan, phase: str = "drive") -> Result:
        import requests

        path, body = self.body(p)
        t0 = time.monotonic()
        read_timeout = p.timeout_s if p.kind == "abort" else self.request_timeout
        res = Result(p, "error", phase=phase)
        try:
            with requests.post(self.base + path, json=body, stream=p.stream, timeout=(10, read_timeout)) as r:
                if r.status_code != 200:
                    res.status, res.detail = f"http_{r.status_code}", r.text[:300]
                elif p.stream:
                    self._read_stream(r, p, res)
                else:
                    data = r.json()
                    choice = data["choices"][0]
                    res.text = choice["message"]["content"] if p.endpoint == "chat" else choice["text"]
                    res.tokens = int(data["usage"]["completion_tokens"])
                    res.status = "ok"
        except requests.Timeout as e:
            if p.kind == "abort":
                res.status = "abort"
            else:
                res.status, res.detail = "error", f"client timeout after {read_timeout:g} s: {e}"
        except (requests.RequestException, ValueError, KeyError, IndexError, TypeError) as e:
            res.status, res.detail = "error", f"{type(e).__name__}: {e}"[:300]
        res.seconds = time.monotonic() - t0
        return res

    def _read_stream(self, r: Any, p: Plan, res: Result) -> None:
        parts: list[str] = []
        chunks = 0
        for line in r.iter_lines():
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                res.status, res.text, res.tokens = "ok", "".join(parts), chunks
                return
            data = json.loads(payload)
            if "error" in data:
                res.status, res.detail = "error", f"stream error event: {str(data['error'])[:250]}"
                return
            for choice in data.get("choices", []):
                piece = (choice.get("delta") or {}).get("content") if p.endpoint == "chat" else choice.get("text")
                if piece:
                    parts.append(piece)
            chunks += 1
            if p.kind == "disconnect" and chunks >= p.disconnect_after:
                res.status, res.tokens = "disconnect", chunks
                return  # leaving the `with` closes the connection mid-stream
        res.status, res.detail = "error", "stream ended without [DONE]"


# ------------------------------------------------------------------------------------------ server probes


def _chat_body(model: str, prompt: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "add_generation_prompt": True}


def chat_template_available(base: str, model: str) -> bool:
    """Whether the server can render a chat for ``model``: False when ``/tokenize`` of a one-turn chat answers 400
    naming the chat template (vLLM's answer for a tokenizer without one and no ``--chat-template``). Another
    error is raised."""
    import requests

    r = requests.post(base + "/tokenize", json=_chat_body(model, "Hello"), timeout=60)
    if r.status_code == 400 and "chat template" in r.text.lower():
        return False
    r.raise_for_status()
    return True


def fitting_prompts(base: str, model: str, prompts: list[str], limit: int, chat: bool = True) -> list[str]:
    """Prompts whose completion form (and chat form, with ``chat``) leave ``limit`` tokens free (server's
    ``/tokenize``)."""
    import requests

    out = []
    for p in prompts:
        n = 0
        for body in ({"model": model, "prompt": p}, *([_chat_body(model, p)] if chat else [])):
            r = requests.post(base + "/tokenize", json=body, timeout=60)
            r.raise_for_status()
            n = max(n, int(r.json()["count"]))
        if n <= limit:
            out.append(p)
    return out
