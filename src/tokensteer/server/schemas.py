"""The requests the server accepts: OpenAI's completion and chat fields (names and types as in the
``openai`` package), a few common extensions (top_k, min_p, repetition_penalty, ignore_eos), and
the ``tokensteer`` object with per-request controls. Types are strict (``"5"`` is not a number)
and unknown fields are refused, so a typo never silently changes nothing."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tokensteer.server.errors import APIError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class SteerItem(Strict):
    """One steering vector, named from the server's ``--vectors`` folder (never a path)."""

    vector: str
    strength: float | None = None  # None: the file's recommended dose
    layers: list[int] | str | None = None  # [6, 7, 8] or "6-8"; None: the file's recommended layers
    at: Literal["generated", "prompt", "all"] | None = None
    mode: Literal["add", "gcav"] | None = None
    guard: float | None = None


class Constraints(Strict):
    """Hard constraints, as ``tokensteer generate`` takes them (inline values only: no file paths)."""

    ban: list[str] | str = []
    require: list[str] | str = []
    require_within: int | None = None
    words: int | None = None
    sentences: int | None = None
    end_word: str | None = None
    regex: str | None = None
    json_schema: dict | bool | None = None
    script: list[str] | str = []
    script_soft: float | None = None
    vocab: list[str] | None = None
    fast_forward: bool = True


class KVSelect(Strict):
    """TokenSelect settings as an object (``--kv-select k=…,local=…``); those left out keep their defaults."""

    k: int | None = None
    local: int | None = None
    init: int | None = None
    theta: float | None = None
    refresh: int | None = None
    chunk: int | None = None
    extrapolate: bool | None = None


class RetrieveSpec(Strict):
    """REPLUG over a document store named from the server's ``--stores`` folder (never a path):
    ``R(k, tau, every)`` on its own, or, beside a formula with R terms, just the store they read."""

    store: str
    k: int | None = None
    tau: float | None = None
    every: int | None = None


class TokensteerExtra(Strict):
    """The ``tokensteer`` object: a formula, steering vectors, constraints and the formula trace."""

    formula: str | None = None
    steer: list[SteerItem] = []
    constraints: Constraints | None = None
    trace: bool = False
    byte_level: bool = False  # sample byte by byte (the formula may then combine byte distributions)
    kv_select: str | bool | KVSelect | None = None  # TokenSelect for this request: "on", "off", "k=1024,…" or an object
    retrieve: RetrieveSpec | None = None  # retrieval mixtures over a server-side document store


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    """Fields completions and chat share."""

    model: str
    temperature: float | None = None  # OpenAI's default, 1
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None  # accepted as 0 only
    frequency_penalty: float | None = None  # accepted as 0 only
    logit_bias: dict[str, float] | None = None  # accepted empty only
    user: str | None = None  # accepted and ignored
    metadata: dict | None = None  # accepted and ignored
    # extensions (vLLM's names), sent with the openai client's extra_body
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    tokensteer: TokensteerExtra | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str]
    max_tokens: int | None = None  # OpenAI's default, 16
    logprobs: int | None = None
    echo: bool | None = None  # accepted as false only
    best_of: int | None = None  # accepted as 1 (or n) only
    suffix: str | None = None  # not supported


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    refusal: str | None = None


class JSONSchemaFormat(Strict):
    name: str
    schema_: dict | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None


UNSUPPORTED = {
    "tools": "tool calling is not supported by this server",
    "tool_choice": "tool calling is not supported by this server",
    "functions": "function calling is not supported by this server",
    "function_call": "function calling is not supported by this server",
    "audio": "audio output is not supported by this server",
    "modalities": "only text output is supported by this server",
}


def parse(cls: type[Strict], body: dict) -> Strict:
    """Validate a request body; the first problem becomes a 400 naming the field."""
    for k, why in UNSUPPORTED.items():
        if body.get(k) is not None:
            raise APIError(400, f"{k}: {why}", param=k, code="unsupported_parameter")
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        raise APIError(400, *describe(e)) from None


def describe(e: ValidationError) -> tuple[str, str, str]:
    """A one-line message, the field's dotted path and a code for a pydantic error."""
    errors = e.errors(include_url=False)
    err = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
    loc = [str(p) for p in err["loc"] if isinstance(p, int) or ("[" not in p and p not in TYPE_TAGS)]
    param = ".".join(loc)
    if err["type"] == "extra_forbidden":
        return f"unknown field {param!r}", param, "unknown_parameter"
    if err["type"] == "missing":
        return f"{param!r} is required", param, "missing_parameter"
    given = err.get("input")
    shown = repr(given) if len(repr(given)) <= 60 else repr(given)[:57] + "..."
    return f"{param}: {err['msg'].lower()}, got {shown}", param, "invalid_type"


TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "function-after", "literal"}
