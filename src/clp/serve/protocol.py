"""The OpenAI wire format: request validation, response bodies and stream chunks.

Validation is written out by hand rather than left to pydantic so that every bad field
ends as the OpenAI error object (``{"error": {"message", "type", "param", "code"}}``) with
the field's name in ``param``, which is what the official client and chat UIs display.
"""

from __future__ import annotations

import json
import math
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from clp.api import MODES
from clp.decoding import Result, SamplingConfig
from clp.errors import ClpError
from clp.prompts import encode_prompt

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
FINISH_REASONS = {
    "eos": "stop",
    "stop_string": "stop",
    "max_new_tokens": "length",
    "context": "length",
    "cancelled": "stop",
}
MAX_STOP_STRINGS = 16
# Fields that change what the reply is and that this server does not implement: refuse them
# (a silent ignore would return something else than the client asked for). Falsy values pass.
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions", "logit_bias")
UNSUPPORTED_NONZERO = ("presence_penalty", "frequency_penalty")


class ApiError(Exception):
    """A request the server refuses: an HTTP status and the OpenAI error object."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )

    def body(self) -> dict:
        """The JSON body OpenAI clients parse into their exception's ``.body``."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass
class Limits:
    """What a request is checked against: the served model and the server's settings."""

    model_name: str
    context_length: int
    vocab_size: int
    default_mode: str
    default_max_tokens: int


@dataclass
class GenRequest:
    """A validated request: everything the decode loop needs, nothing of HTTP."""

    kind: str  # "chat" or "completion"
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingConfig
    stop: list[str]
    mode: str
    tau: float | None
    stream: bool
    include_usage: bool
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        prefix = "chatcmpl-" if self.kind == "chat" else "cmpl-"
        self.id = self.id or prefix + uuid.uuid4().hex[:24]


def parse_json(body: bytes) -> dict:
    """The request body as a JSON object, or a 400 the client can read."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(
            400, f"the request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return data


def parse_chat(data: dict, tokenizer, limits: Limits) -> GenRequest:
    """A /v1/chat/completions body, with the messages run through the model's chat template."""
    _check_model(data.get("model"), limits)
    _check_unsupported(data)
    ids = encode_messages(tokenizer, _messages(data.get("messages")))
    if "max_completion_tokens" in data and data.get("max_tokens") is None:
        data = {**data, "max_tokens": data["max_completion_tokens"]}
    return _common(data, "chat", ids, limits)


def parse_completion(data: dict, tokenizer, limits: Limits) -> GenRequest:
    """A /v1/completions body: the prompt is taken as it is (no chat template)."""
    _check_model(data.get("model"), limits)
    _check_unsupported(data)
    return _common(data, "completion", _prompt_ids(data.get("prompt"), tokenizer, limits), limits)


def _common(data: dict, kind: str, ids: list[int], limits: Limits) -> GenRequest:
    """The fields both endpoints share, once the prompt is known to be well formed."""
    n = data.get("n", 1)
    if n is not None and (_int(n, "n") != 1):
        raise ApiError(400, "only n=1 is supported (one backbone, one sequence)", param="n")
    if len(ids) >= limits.context_length:
        raise ApiError(
            400,
            f"the prompt has {len(ids)} tokens; the model's context holds {limits.context_length}",
            param="messages" if kind == "chat" else "prompt",
            code="context_length_exceeded",
        )
    room = limits.context_length - len(ids)
    max_tokens = _max_tokens(data.get("max_tokens"), room, limits.default_max_tokens, len(ids))
    mode = data.get("mode", limits.default_mode)
    if mode is None:
        mode = limits.default_mode
    if not isinstance(mode, str) or mode not in MODES:
        raise ApiError(400, f"unknown mode {mode!r}; available: {', '.join(MODES)}", param="mode")
    tau = _number(data.get("tau"), "tau")
    stream = _bool(data.get("stream", False), "stream")
    options = data.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    return GenRequest(
        kind=kind,
        prompt_ids=ids,
        max_tokens=max_tokens,
        sampling=_sampling(data),
        stop=_stop(data.get("stop")),
        mode=mode,
        tau=tau,
        stream=stream,
        include_usage=stream and _bool(options.get("include_usage", False), "stream_options"),
    )


def _check_model(model: Any, limits: Limits) -> None:
    if not isinstance(model, str) or not model:
        raise ApiError(400, "the 'model' field is required", param="model")
    if model != limits.model_name:
        raise ApiError(
            404,
            f"the model '{model}' does not exist; this server serves '{limits.model_name}'",
            param="model",
            code="model_not_found",
        )


def _check_unsupported(data: dict) -> None:
    for name in UNSUPPORTED:
        if data.get(name):
            raise ApiError(400, f"'{name}' is not supported by this server", param=name)
    for name in UNSUPPORTED_NONZERO:
        if _number(data.get(name), name):
            raise ApiError(400, f"'{name}' other than 0 is not supported", param=name)
    best_of = data.get("best_of")
    if best_of is not None and _int(best_of, "best_of") != 1:
        raise ApiError(400, "only best_of=1 is supported", param="best_of")
    fmt = data.get("response_format")
    if fmt and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise ApiError(400, "only the text response_format is supported", param="response_format")


def _messages(messages: Any) -> list[dict]:
    """The chat turns as ``{"role", "content"}`` with text content, roles checked."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(
                400,
                f"messages[{i}].role {role!r} is not supported; use system, user or assistant",
                param=f"messages[{i}].role",
            )
        turns.append({"role": ROLES[role], "content": _content(m.get("content"), i)})
    if not any(t["content"].strip() for t in turns):
        raise ApiError(400, "the messages hold no text", param="messages")
    if not any(t["role"] == "user" for t in turns):
        raise ApiError(400, "the messages need at least one user turn", param="messages")
    return turns


def _content(content: Any, i: int) -> str:
    """Text content: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"):
                raise ApiError(
                    400, "only text content parts are supported", param=f"messages[{i}].content"
                )
            texts.append(_text(part.get("text"), f"messages[{i}].content"))
        return "".join(texts)
    raise ApiError(400, f"messages[{i}].content must be text", param=f"messages[{i}].content")


def encode_messages(tokenizer, turns: list[dict]) -> list[int]:
    """Token ids of a conversation: the tokenizer's chat template with the assistant's turn
    opened. A lone user turn goes through clp's own ``encode_prompt``, so a served chat gets
    the very ids ``Model.generate(prompt)`` would. A model without a chat template gets a
    plain ``role: text`` transcript (one user turn: the text alone, as ``clp generate``)."""
    if len(turns) == 1 and turns[0]["role"] == "user":
        try:
            return encode_prompt(tokenizer, turns[0]["content"])
        except ClpError as exc:
            raise ApiError(400, str(exc), param="messages") from exc
    if not getattr(tokenizer, "chat_template", None):
        lines = [f"{t['role']}: {t['content']}" for t in turns]
        return list(tokenizer("\n".join(lines + ["assistant:"]))["input_ids"])
    try:
        ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
    except Exception as exc:  # jinja raises TemplateError for turns the template refuses
        raise ApiError(
            400, f"the chat template refused the messages: {exc}", param="messages"
        ) from exc
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def _prompt_ids(prompt: Any, tokenizer, limits: Limits) -> list[int]:
    """A completion prompt: a string or token ids, or a list holding exactly one of them."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        try:
            return encode_prompt(tokenizer, prompt, raw=True)
        except ClpError as exc:
            raise ApiError(400, str(exc), param="prompt") from exc
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        if not all(0 <= t < limits.vocab_size for t in prompt):
            raise ApiError(400, f"token ids must be in [0, {limits.vocab_size})", param="prompt")
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise ApiError(400, "only one prompt per request is supported", param="prompt")
    raise ApiError(400, "'prompt' must be a non-empty string or token ids", param="prompt")


def _max_tokens(value: Any, room: int, default: int, prompt_tokens: int) -> int:
    if value is None:
        return min(default, room)
    n = _int(value, "max_tokens")
    if n <= 0:
        raise ApiError(400, f"max_tokens must be > 0, got {n}", param="max_tokens")
    if n > room:
        raise ApiError(
            400,
            f"max_tokens is {n}, but the prompt has {prompt_tokens} tokens and the context "
            f"holds {prompt_tokens + room}: at most {room} new tokens fit",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return n


def _sampling(data: dict) -> SamplingConfig:
    """temperature (OpenAI's default 1), top_p, top_k and seed; a sampled request without a
    seed gets a fresh one, as OpenAI's would (the decode loop alone would always use 0)."""
    temperature = _number(data.get("temperature"), "temperature")
    temperature = 1.0 if temperature is None else temperature
    if not 0 <= temperature <= 2:
        message = f"temperature must be in [0, 2], got {temperature}"
        raise ApiError(400, message, param="temperature")
    top_p = _number(data.get("top_p"), "top_p")
    top_k = data.get("top_k")
    seed = data.get("seed")
    if seed is not None and not 0 <= _int(seed, "seed") < 2**63:
        raise ApiError(400, "seed must be in [0, 2**63)", param="seed")
    config = SamplingConfig(
        temperature=temperature,
        top_k=0 if top_k is None else _int(top_k, "top_k"),
        top_p=1.0 if top_p is None else top_p,
        seed=seed if seed is not None or temperature == 0 else secrets.randbits(62),
    )
    try:
        config.validate()
    except ClpError as exc:
        raise ApiError(400, str(exc), param=str(exc).split()[0]) from exc
    return config


def _stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
    return stops


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(value: Any, name: str) -> int:
    if _is_int(value):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ApiError(400, f"'{name}' must be an integer", param=name)


def _number(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise ApiError(400, f"'{name}' must be a finite number", param=name)


def _bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ApiError(400, f"'{name}' must be true or false", param=name)


def _text(value: Any, name: str) -> str:
    if isinstance(value, str):
        return value
    raise ApiError(400, f"'{name}' must be text", param=name)


# ---- responses ------------------------------------------------------------------------


def usage(result: Result) -> dict:
    s = result.stats
    return {
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.new_tokens,
        "total_tokens": s.prompt_tokens + s.new_tokens,
    }


def extension(req: GenRequest, result: Result) -> dict:
    """The ``clp`` object beside ``usage``: how the reply was decoded and what it cost."""
    s = result.stats
    return {
        "mode": req.mode,
        "tau": req.tau,
        "tokens_per_forward": round(s.tokens_per_forward, 4),
        "forward_passes": s.forward_passes,
        "seconds": round(s.seconds, 4),
        "tokens_per_second": round(s.tokens_per_second, 3),
        "stop_reason": result.stop_reason,
    }


def response(req: GenRequest, result: Result, model: str) -> dict:
    """The whole (non-streamed) chat.completion or text_completion object."""
    finish = FINISH_REASONS[result.stop_reason]
    if req.kind == "chat":
        message = {"role": "assistant", "content": result.text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {
        **_envelope(req, obj, model, choice),
        "usage": usage(result),
        "clp": extension(req, result),
    }


def chunk(req: GenRequest, model: str, text: str | None, finish: str | None = None) -> dict:
    """One stream chunk; ``text`` None on a chat stream is the opening role delta."""
    if req.kind == "chat":
        delta = {"role": "assistant", "content": ""} if text is None else {"content": text}
        if finish:
            delta = {}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return _envelope(req, obj, model, choice)


def _envelope(req: GenRequest, obj: str, model: str, choice: dict) -> dict:
    """The fields every completion object and stream chunk carries."""
    return {
        "id": req.id,
        "object": obj,
        "created": req.created,
        "model": model,
        "choices": [choice],
    }


def final_chunks(req: GenRequest, result: Result, model: str) -> list[dict]:
    """The chunk with the finish reason (and the ``clp`` object), then the usage chunk
    (empty choices) when the client asked for ``stream_options.include_usage``."""
    last = chunk(req, model, None, FINISH_REASONS[result.stop_reason])
    last["clp"] = extension(req, result)
    chunks = [last]
    if req.include_usage:
        tail = chunk(req, model, None)
        tail["choices"] = []
        tail["usage"] = usage(result)
        tail["clp"] = last["clp"]
        chunks.append(tail)
    return chunks


def sse(data: dict | str) -> bytes:
    """One server-sent event as the openai client reads it: ``data: <json>`` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()
