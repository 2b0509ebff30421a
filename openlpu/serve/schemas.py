"""Chat completion request, as GroqCloud takes it (pydantic v2, strict, unknown fields rejected).

Field list and limits: GroqCloud's API reference and the `groq` SDK 1.7.0 request types
(summarised in /work/shared/reference/groqcloud-api.md). Validation failures become GroqCloud's
400 body, never FastAPI's 422 default.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from openlpu.serve.errors import APIError, bad_request

ROLES = ("system", "developer", "user", "assistant")  # and "tool", refused below: this model takes no tools
MAX_STOP_SEQUENCES = 4

# Fields GroqCloud accepts for some models but this server cannot honour: a clear 400 each when set to
# anything but null or their neutral value (false, 0, empty; "none" for those in NONE_VALUED), which clients send
# by default.
# (logprobs, top_logprobs, logit_bias and messages[].name GroqCloud itself answers with 400.)
UNSUPPORTED_FIELDS: dict[str, str] = {
    "logprobs": "`logprobs` is not supported",
    "top_logprobs": "`top_logprobs` is not supported",
    "logit_bias": "`logit_bias` is not supported",
    "tools": "`tools` is not supported by this model",
    "tool_choice": "`tool_choice` is not supported by this model",
    "parallel_tool_calls": "`parallel_tool_calls` is not supported by this model",
    "frequency_penalty": "`frequency_penalty` is not supported; send 0 or leave it out",
    "presence_penalty": "`presence_penalty` is not supported; send 0 or leave it out",
    "store": "`store` is not supported; send false or leave it out",
    "metadata": "`metadata` is not supported; leave it out",
    "reasoning_format": "`reasoning_format` is not supported by this model",
    "reasoning_effort": "`reasoning_effort` is not supported by this model",
    "include_reasoning": "`include_reasoning` is not supported by this model",
    "functions": "`functions` is not supported by this model",
    "function_call": "`function_call` is not supported by this model",
    "disable_tool_validation": "`disable_tool_validation` is not supported by this model (it takes no tools)",
    "search_settings": "`search_settings` is not supported by this model (it does not search)",
    "include_domains": "`include_domains` is not supported by this model (it does not search)",
    "exclude_domains": "`exclude_domains` is not supported by this model (it does not search)",
    "documents": "`documents` is not supported by this model",
    "citation_options": "`citation_options` is not supported by this model",
    "compound_custom": "`compound_custom` is not supported by this model",
}
# A message's fields the SDKs send back with a reply put into the history (the openai SDK's model_dump() of a
# message gives refusal, annotations, audio, function_call and tool_calls, null), or that carry tools: refused,
# as UNSUPPORTED_FIELDS, when set to anything but null or empty.
UNSUPPORTED_MESSAGE_FIELDS: dict[str, str] = {
    "tool_calls": "tool calls are not supported by this model",
    "function_call": "function calls are not supported by this model",
    "tool_call_id": "a message answering a tool call is not supported by this model (it takes no tools)",
    "executed_tools": "executed tools are not supported by this model",
    "reasoning": "reasoning is not supported by this model",
    "refusal": "refusals are not supported by this model",
    "annotations": "annotations are not supported by this model",
    "audio": "audio is not supported by this model (it takes text only)",
}
# "none": no tools, no reasoning (GroqCloud's and the SDK's values; function_call is tool_choice's older name)
NONE_VALUED = ("tool_choice", "function_call", "reasoning_effort")
# Optional fields a client may send as null (the SDKs declare them Optional): null means the default.
DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "n": 1, "stream": False}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class _MessageText(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart]
    name: str | None = None  # rejected below, as GroqCloud does

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


# a message: its text, and each field of UNSUPPORTED_MESSAGE_FIELDS, refused below unless null or empty
Message = create_model("Message", __base__=_MessageText, **{name: (Any, None) for name in UNSUPPORTED_MESSAGE_FIELDS})


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]  # the last two are refused: they need constrained decoding
    json_schema: dict | None = None


class ChatCompletionRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)  # deprecated alias
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)  # None: DEFAULTS, after parsing
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)  # torch.Generator's range
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    service_tier: Literal["on_demand", "flex", "auto", "performance"] | None = None
    # Answered with 400 when set (see UNSUPPORTED_FIELDS); declared so the message is precise.
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    reasoning_format: str | None = None
    reasoning_effort: str | None = None
    include_reasoning: bool | None = None
    functions: Any = None
    function_call: Any = None
    disable_tool_validation: bool | None = None
    search_settings: Any = None
    include_domains: Any = None
    exclude_domains: Any = None
    documents: Any = None
    citation_options: Any = None
    compound_custom: Any = None

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def _loc(loc: tuple) -> str:
    """('messages', 0, 'role') -> 'messages.0.role' (GroqCloud's param style)."""
    return ".".join(str(p) for p in loc)


def _validation_error(err: ValidationError) -> APIError:
    first = err.errors(include_url=False)[0]
    kind, loc = first["type"], _loc(first["loc"])
    if kind == "json_invalid":
        return bad_request(f"The request body is not valid JSON ({first['msg']}); send a JSON object.")
    if kind == "model_type" and not first["loc"]:
        return bad_request("The request body must be a JSON object.")
    if len(first["loc"]) >= 3 and first["loc"][0] == "messages" and first["loc"][2] == "content":
        where = _loc(first["loc"][:3])  # drop pydantic's union-member tags (str / list[TextPart])
        return bad_request(f"'{where}' : content must be a string or a list of text parts "
                           "({\"type\": \"text\", \"text\": ...}); this model takes text only", param=where)
    if first["loc"] and first["loc"][0] == "stop":  # drop pydantic's union-member tags (str / list[str])
        return bad_request(f"'stop' : must be a string or a list of at most {MAX_STOP_SEQUENCES} strings",
                           param="stop")
    if kind == "extra_forbidden":
        return bad_request(f"property '{loc}' is unsupported", param=loc)
    if kind == "missing":
        return bad_request(f"'{loc}' : property '{loc}' is missing", param=loc)
    if kind == "too_short" and loc == "messages":
        return bad_request("'messages' : at least one message is required", param="messages")
    if kind == "literal_error" and loc.endswith(".role"):
        return bad_request(f"'{loc}' : role {first['input']!r} is not one of {', '.join(ROLES)}",
                           param=loc)
    return bad_request(f"'{loc}' : {first['msg'].lower()}", param=loc)


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    """Parse and check a request body; every problem is an APIError with GroqCloud's 400 body."""
    try:
        req = ChatCompletionRequest.model_validate_json(body)
    except ValidationError as e:
        raise _validation_error(e) from None
    req = req.model_copy(update={name: value for name, value in DEFAULTS.items() if getattr(req, name) is None})
    for name, message in UNSUPPORTED_FIELDS.items():
        value = getattr(req, name)  # what a client sends when it means none
        if value and not (name in NONE_VALUED and value == "none"):
            raise bad_request(message, param=name)
    if req.response_format and req.response_format.type != "text":
        raise bad_request(f"`response_format` {req.response_format.type} is not supported by this model (it needs "
                          "constrained decoding); send {\"type\": \"text\"} or leave it out",
                          param="response_format")
    for i, m in enumerate(req.messages):
        if m.name is not None:
            raise bad_request(f"'messages.{i}' : property 'name' is unsupported", param=f"messages.{i}.name")
        if m.role == "tool":
            raise bad_request(f"'messages.{i}' : role 'tool' carries a tool's result, and this model takes no tools",
                              param=f"messages.{i}.role")
        for name, message in UNSUPPORTED_MESSAGE_FIELDS.items():
            if getattr(m, name) not in (None, [], {}, ""):  # false or 0 is no null: refused as set
                raise bad_request(f"'messages.{i}.{name}' : {message}; send null or leave it out",
                                  param=f"messages.{i}.{name}")
    if req.n != 1:
        raise bad_request(f"'n' : only 1 choice is supported, got {req.n}", param="n")
    stops = req.stop_sequences()
    if len(stops) > MAX_STOP_SEQUENCES:
        raise bad_request(f"'stop' : at most {MAX_STOP_SEQUENCES} stop sequences are allowed", param="stop")
    if any(s == "" for s in stops):
        raise bad_request("'stop' : stop sequences must not be empty", param="stop")
    return req
