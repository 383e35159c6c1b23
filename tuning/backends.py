"""Where agent replies come from: rules (offline, deterministic), a local causal LM, or an OpenAI-compatible
HTTP endpoint. Every backend returns text (or, for rules, ``None``: the agent's own rule answers); the agent
parses and validates it, and falls back to its rule when anything goes wrong."""

from __future__ import annotations

import ipaddress
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Literal

from tuning.space import check_minimums


def extract_json(text: str) -> dict[str, Any]:
    """The first JSON object in ``text``: the whole text, else the first top-level balanced ``{...}`` that parses
    (models often wrap JSON in prose or code fences). Top-level: an object nested in braces that close but do not
    parse is not tried on its own, which keeps the search linear in the length of ``text``.

    Raises ``ValueError`` (and nothing else) when there is none: for text that is not a string, and for objects
    too deeply nested or with integers too long for Python's ``json`` to read.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected text, got {type(text).__name__}")
    value = _loads(text)
    if isinstance(value, dict):
        return value
    for start, end in _top_level_spans(text):
        value = _loads(text[start:end])
        if isinstance(value, dict):
            return value
    raise ValueError(f"no JSON object in the reply: {text[:120]!r}")


def _loads(text: str) -> Any:
    """``json.loads(text)``, or ``None`` when it does not parse (including too deep or too long numbers)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # JSONDecodeError and the integer-digits limit are ValueErrors
        return None


def _top_level_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of every balanced ``{...}`` not inside another one, in order: one pass, braces inside JSON
    strings ignored (quotes count only inside braces; prose between objects may hold any)."""
    spans: list[tuple[int, int]] = []
    opened: list[int] = []
    in_string = escaped = False
    i = text.find("{")
    while 0 <= i < len(text):
        if not opened:  # in prose: jump to the next brace
            i = text.find("{", i)
            if i < 0:
                break
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c == "{":
            opened.append(i)
        elif c == "}":
            start = opened.pop()
            while spans and spans[-1][0] > start:  # spans inside this one are not top-level
                spans.pop()
            spans.append((start, i + 1))
        i += 1
    return spans


@dataclass
class BackendSettings:
    """Which backend answers for the agents, and how to reach it."""

    kind: Literal["rule", "local", "http"] = "rule"
    """``rule`` (offline, deterministic), ``local`` (a causal LM through the project's LM factory) or ``http`` (an
    OpenAI-compatible ``/v1/chat/completions`` endpoint)."""
    model: str = "tiny-llama"
    """The model: a hub name or local folder for ``local``; the served model name for ``http``."""
    base_url: str = "http://127.0.0.1:8000/v1"
    """Base URL of the HTTP endpoint (``.../v1``); ``/chat/completions`` is appended."""
    api_key_env: str | None = None
    """NAME of the environment variable holding the API key, e.g. ``OPENAI_API_KEY`` (the key itself is never
    stored or logged). No default: without a name no key is sent. A key is sent only over ``https``, or plain
    ``http`` to a loopback host (``localhost``, ``127.0.0.1``, ``::1``)."""
    temperature: float = 0.2
    """Sampling temperature of LLM backends."""
    max_new_tokens: int = 256
    """Longest reply of LLM backends."""
    timeout_s: float = 60.0
    """HTTP timeout per request."""
    retries: int = 1
    """Extra attempts after a failed HTTP request."""
    json_mode: bool = True
    """Ask the HTTP endpoint for a JSON object (``response_format``); turn off for servers that reject it."""
    trust_remote_code: bool = False
    """Let a local model run code shipped with it (off unless you opt in)."""

    def __post_init__(self) -> None:
        check_minimums(self, {"temperature": 0, "max_new_tokens": 1, "retries": 0}, above={"timeout_s": 0})
        check_key_transport(self.base_url, self.api_key_env)


def check_key_transport(base_url: str, api_key_env: str | None) -> None:
    """``ValueError`` unless ``base_url`` is ``http(s)://``, and, when a key variable is named, ``https://`` or
    plain ``http://`` to a loopback host: a key must not cross a network in clear text."""
    url = urllib.parse.urlsplit(base_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"base_url must be an http:// or https:// URL, got {base_url!r}")
    if api_key_env and url.scheme == "http" and not _loopback(url.hostname):
        raise ValueError(f"api_key_env must be unset for base_url {base_url!r}: plain http to a non-loopback host "
                         "would carry the key in clear text (use https)")


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost
        return False


class RuleBackend:
    """No model: each agent answers with its own deterministic rule."""

    name = "rule"

    def complete(self, system: str, user: str) -> str | None:
        return None


class HTTPBackend:
    """An OpenAI-compatible chat-completions endpoint over ``urllib`` (OpenAI, vLLM, llama.cpp server, ...)."""

    name = "http"

    def __init__(self, settings: BackendSettings) -> None:
        check_key_transport(settings.base_url, settings.api_key_env)  # the settings may have changed since
        self.settings = settings
        self.url = settings.base_url.rstrip("/") + "/chat/completions"

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.settings.api_key_env) if self.settings.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def complete(self, system: str, user: str) -> str:
        """The reply's text. Raises ``RuntimeError`` (naming the URL and the cause, never the request headers) when
        every attempt failed: a refused connection, a timeout, an HTTP error status, or a reply that is not UTF-8
        JSON with ``choices[0].message.content``."""
        body: dict[str, Any] = {
            "model": self.settings.model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "temperature": self.settings.temperature,
            "max_tokens": self.settings.max_new_tokens,
        }
        if self.settings.json_mode:
            body["response_format"] = {"type": "json_object"}
        error: Exception | None = None
        for _ in range(self.settings.retries + 1):
            request = urllib.request.Request(self.url, json.dumps(body).encode(), self._headers(), method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.settings.timeout_s) as response:
                    reply = json.loads(response.read().decode())
                return reply["choices"][0]["message"]["content"]
            except urllib.error.HTTPError as e:  # the message names the status, never the request headers
                error = RuntimeError(f"HTTP {e.code} from {self.url}")
            except UnicodeDecodeError:
                error = RuntimeError(f"reply from {self.url} is not UTF-8 text")
            except (urllib.error.URLError, TimeoutError, OSError, KeyError, IndexError, TypeError, ValueError,
                    RecursionError) as e:  # ValueError: not JSON (JSONDecodeError), or a number too long to read
                error = RuntimeError(f"{type(e).__name__} from {self.url}")
        raise error


class LocalLMBackend:
    """A causal LM loaded with the project's factory (a hub name, a local folder, or the offline tiny model),
    prompted with its chat template when it has one. Its reply is parsed and validated like any other."""

    name = "local"

    def __init__(self, settings: BackendSettings, tokenizer=None) -> None:
        from models.lm_factory import TINY_ARCHITECTURES, build_causal_lm, load_tokenizer

        self.settings = settings
        if settings.model in TINY_ARCHITECTURES and tokenizer is None:
            raise ValueError("the local backend with a tiny model needs the task's tokenizer")
        self.tokenizer = tokenizer if settings.model in TINY_ARCHITECTURES else load_tokenizer(
            settings.model, settings.trust_remote_code)
        self.model = build_causal_lm(settings.model, self.tokenizer, trust_remote_code=settings.trust_remote_code)
        self.model.eval()

    def _prompt(self, system: str, user: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"{system}\n\n{user}\n\nJSON:"

    def complete(self, system: str, user: str) -> str:
        import torch

        encoded = self.tokenizer(self._prompt(system, user), return_tensors="pt", add_special_tokens=False)
        limit = getattr(self.model.config, "max_position_embeddings", 2048) - self.settings.max_new_tokens
        ids = encoded.input_ids[:, -max(1, limit):]
        sampling = self.settings.temperature > 0
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.settings.max_new_tokens,
                do_sample=sampling, temperature=self.settings.temperature if sampling else None,
                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
            )
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def make_backend(settings: BackendSettings, tokenizer=None):
    """The backend ``settings.kind`` names."""
    if settings.kind == "rule":
        return RuleBackend()
    if settings.kind == "http":
        return HTTPBackend(settings)
    if settings.kind == "local":
        return LocalLMBackend(settings, tokenizer)
    raise ValueError(f"unknown backend {settings.kind!r}; expected rule, local or http")
