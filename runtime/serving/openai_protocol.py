"""OpenAI completions and chat-completions requests as pydantic v2 models, and their checks.

The models carry OpenAI's full field set (plus vLLM's sampling extensions: top_k, min_p,
repetition_penalty, ignore_eos, min_tokens, stop_token_ids). They are strict (no "7" for 7) and
forbid unknown fields, so a request is either understood or refused with a 400 naming the field.
`REFUSED` lists the fields this server accepts only at their neutral value (tools, audio, ...);
`docs/serving.md` has the per-field table. pydantic parses the JSON too (pydantic-core, with a
nesting limit), so a hostile body fails as a validation error, not a RecursionError.
"""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class RequestError(Exception):
    """A client error: HTTP status, message, the offending field, and OpenAI's error type and code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
                             413: "invalid_request_error", 503: "service_unavailable"}.get(
            status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        """The OpenAI-shaped error object."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    """`stream_options`: usage in a final chunk of its own (`choices: []`)."""

    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None       # vLLM: usage on every chunk


class _Sampling(_Strict):
    """Fields both APIs share."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 63)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM / SGLang sampling extensions
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = None
    return_token_ids: bool = False                   # vLLM: each choice (chunk) carries its token ids


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    best_of: int | None = Field(None, ge=1, le=128)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None


class ContentPart(_Strict):
    """A text part of a chat message's content."""

    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    """One chat message (text only)."""

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None


class ChatRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: Union[str, dict[str, Any], None] = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    web_search_options: dict[str, Any] | None = None


# field -> (neutral values accepted, why anything else is refused)
REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "suffix": ((None, ""), "insertion (suffix) is not supported by this model"),
    "tools": ((None, []), "tool calling is not supported by this model"),
    "tool_choice": ((None, "none", "auto"), "tool calling is not supported by this model"),
    "functions": ((None, []), "function calling is not supported by this model"),
    "function_call": ((None, "none", "auto"), "function calling is not supported by this model"),
    "audio": ((None,), "audio output is not supported by this model"),
    "modalities": ((None, ["text"]), "only the text modality is supported"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "metadata": ((None, {}), "stored completions are not supported (metadata goes with store)"),
    "store": ((None, False), "stored completions are not supported"),
    "service_tier": ((None, "auto", "default"), "this server has one service tier ('default')"),
    "reasoning_effort": ((None,), "this model does not reason (reasoning_effort)"),
    "web_search_options": ((None,), "web search is not supported"),
    "continuous_usage_stats": ((None, False), "usage is reported in the final chunk only (include_usage)"),
}


def parse_body(raw: bytes, chat: bool) -> CompletionRequest | ChatRequest:
    """Parse and validate a request body; RequestError (400) names the first bad field."""
    cls = ChatRequest if chat else CompletionRequest
    try:
        req = cls.model_validate_json(raw)
    except ValidationError as e:
        raise _from_validation(e, "chat completions" if chat else "completions") from None
    for name, (ok, why) in REFUSED.items():
        holder = req.stream_options if name == "continuous_usage_stats" else req
        v = getattr(holder, name, None)
        if v not in ok:
            raise RequestError(400, f"'{name}'={_short(v)} is refused: {why}; accepted: "
                                    f"{', '.join(repr(x) for x in ok)} (or leave it out)", name, "unsupported_field")
    if isinstance(req, ChatRequest):
        rf = req.response_format
        if rf is not None and rf.get("type") != "text":
            raise RequestError(400, f"'response_format' type {rf.get('type')!r} is refused: this server does not "
                                    "constrain output (json_object / json_schema); use {\"type\": \"text\"} or "
                                    "leave it out", "response_format", "unsupported_field")
        if req.top_logprobs is not None and not req.logprobs:
            raise RequestError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        if req.max_tokens is not None and req.max_completion_tokens is not None \
                and req.max_tokens != req.max_completion_tokens:
            raise RequestError(400, "'max_tokens' and 'max_completion_tokens' disagree; send one", "max_tokens")
    else:
        if req.best_of is not None and req.best_of < req.n:
            raise RequestError(400, f"'best_of'={req.best_of} must be >= 'n'={req.n}", "best_of")
        if req.best_of is not None and req.best_of > req.n and req.stream:
            raise RequestError(400, "'best_of' > 'n' cannot stream (the best are known only at the end)", "best_of")
        if req.echo and req.logprobs is not None:
            raise RequestError(400, "'echo' with 'logprobs' (prompt logprobs) is not supported; drop one of them",
                               "echo", "unsupported_field")
        if isinstance(req.prompt, list) and not req.prompt:
            raise RequestError(400, "'prompt' must not be empty", "prompt")
    if req.stop is not None:
        stops = [req.stop] if isinstance(req.stop, str) else req.stop
        if len(stops) > 4 or not all(stops):
            raise RequestError(400, "'stop' must be a string or a list of at most 4 non-empty strings", "stop")
    if req.min_tokens and req.max_tokens is not None and req.min_tokens > req.max_tokens:
        raise RequestError(400, f"'min_tokens'={req.min_tokens} exceeds 'max_tokens'={req.max_tokens}", "min_tokens")
    return req


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _from_validation(e: ValidationError, api: str) -> RequestError:
    err = e.errors(include_url=False)[0]
    loc = [str(x) for x in err.get("loc", ())]
    kind = err.get("type", "")
    if kind == "json_invalid":
        return RequestError(400, f"malformed JSON body: {err.get('msg')}", None, "invalid_json")
    if not loc:
        return RequestError(400, f"request body must be a JSON object ({err.get('msg')})")
    param = loc[0]
    where = ".".join(loc)
    if kind == "extra_forbidden" and len(loc) == 1:
        return RequestError(400, f"'{param}' is not a field of the OpenAI {api} API", param, "unknown_field")
    return RequestError(400, f"'{where}': {err.get('msg')} (got {_short(err.get('input'))})", param)
