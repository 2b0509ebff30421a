"""The serving pieces that need no running server: request parsing, rate limits, chat format."""

import dataclasses
import json

import pytest

from openlpu.errors import OpenLPUError
from openlpu.serve.chat_format import gemma_segments, prompt_ids, render_template
from openlpu.serve.errors import APIError
from openlpu.serve.ratelimit import KeyLimits, RateLimiter, format_duration, load_keys_file
from openlpu.serve.schemas import parse_chat_request

GOOD = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def body(**changes) -> bytes:
    return json.dumps({**GOOD, **changes}).encode()


# ---- request parsing ------------------------------------------------------------------------
@pytest.mark.parametrize("raw, param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    (json.dumps({"messages": GOOD["messages"]}).encode(), "model"),
    (body(messages=[]), "messages"),
    (body(messages=[{"role": "robot", "content": "x"}]), "messages.0.role"),
    (body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages.0.content"),
    (body(messages=[{"role": "user", "content": "x", "name": "bob"}]), "messages.0.name"),
    (body(temperature="hot"), "temperature"),
    (body(temperature=2.5), "temperature"),
    (body(top_p=1.5), "top_p"),
    (body(max_completion_tokens=0), "max_completion_tokens"),
    (body(n=2), "n"),
    (body(stop=["a", "b", "c", "d", "e"]), "stop"),
    (body(logprobs=True), "logprobs"),
    (body(top_logprobs=3), "top_logprobs"),
    (body(logit_bias={"42": 5}), "logit_bias"),
    (body(frobnicate=True), "frobnicate"),
    (body(n=0), "n"),
    (body(stop=5), "stop"),
    (body(frequency_penalty=0.5), "frequency_penalty"),
    (body(store=True), "store"),
    (body(reasoning_format="parsed"), "reasoning_format"),
    (body(tool_choice="auto"), "tool_choice"),
    (body(reasoning_effort="low"), "reasoning_effort"),
    (body(reasoning_format="none"), "reasoning_format"),  # "none" means none only where GroqCloud lists it
    (body(response_format={"type": "json_object"}), "response_format"),
    (body(response_format={"type": "yaml"}), "response_format.type"),
    (body(stream_options={"include_usage": True, "extra": 1}), "stream_options.extra"),
    (body(include_reasoning=True), "include_reasoning"),
    (body(search_settings={"include_domains": ["x.org"]}), "search_settings"),
    (body(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": "",
                                                      "tool_calls": [{"id": "c1", "type": "function"}]}]),
     "messages.1.tool_calls"),
    (body(messages=[{"role": "tool", "content": "42", "tool_call_id": "c1"}]), "messages.0.role"),
    (body(messages=[{"role": "assistant", "content": "x", "reasoning": "because"}]), "messages.0.reasoning"),
    (body(messages=[{"role": "assistant", "content": "x", "tool_calls": False}]), "messages.0.tool_calls"),
    (body(function_call="auto"), "function_call"),
])
def test_bad_requests_get_groqcloud_400(raw, param):
    with pytest.raises(APIError) as e:
        parse_chat_request(raw)
    err = e.value.body()["error"]
    assert e.value.status == 400 and err["type"] == "invalid_request_error"
    assert err["param"] == param and err["message"]


def test_good_request_keeps_every_field():
    req = parse_chat_request(body(messages=[{"role": "developer", "content": "be short"},
                                            {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                         {"type": "text", "text": "b"}]}],
                                  max_tokens=7, temperature=0, seed=3, stop="\n", stream=True,
                                  stream_options={"include_usage": True}, user="u1", logprobs=False))
    assert [m.text() for m in req.messages] == ["be short", "ab"]
    assert req.requested_max_tokens() == 7 and req.stop_sequences() == ("\n",)
    assert req.stream and req.stream_options.include_usage and req.temperature == 0.0
    # max_completion_tokens wins over the deprecated max_tokens
    assert parse_chat_request(body(max_tokens=7, max_completion_tokens=9)).requested_max_tokens() == 9


def test_null_and_neutral_values_mean_the_defaults():
    """The groq and openai SDKs send null for an Optional field set to None, and some clients send zero
    penalties, or "none" for tool_choice and reasoning_effort, by default: each means what leaving the field out
    means."""
    plain = parse_chat_request(body())
    nulls = parse_chat_request(body(temperature=None, top_p=None, n=None, stream=None, frequency_penalty=0,
                                    presence_penalty=0.0, store=False, metadata={}, tools=[], logit_bias=None,
                                    tool_choice="none", reasoning_effort="none"))
    assert (nulls.temperature, nulls.top_p, nulls.n, nulls.stream) == (1.0, 1.0, 1, False)
    assert (plain.temperature, plain.top_p, plain.n, plain.stream) == (1.0, 1.0, 1, False)
    assert parse_chat_request(body(response_format={"type": "text"})).response_format.type == "text"


def test_a_reply_put_back_into_the_history_as_the_sdks_dump_it_is_taken():
    """A client keeps the conversation by appending the reply's message as its SDK dumps it: openai's
    model_dump() adds refusal, annotations, audio, function_call and tool_calls as null, groq's annotations,
    executed_tools, reasoning and the rest; each was refused as an unknown property (a review). Null or empty,
    they mean what leaving them out means; set, they are refused (above)."""
    openai_dump = {"role": "assistant", "content": "hello", "refusal": None, "annotations": None, "audio": None,
                   "function_call": None, "tool_calls": None}
    groq_dump = {"role": "assistant", "content": "hello", "annotations": None, "executed_tools": None,
                 "function_call": None, "reasoning": None, "tool_calls": []}
    plain = parse_chat_request(body(messages=[{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "hello"}]))
    for reply in (openai_dump, groq_dump):
        req = parse_chat_request(body(messages=[{"role": "user", "content": "hi"}, reply], functions=None,
                                      function_call="none", include_reasoning=None, documents=None))
        assert [(m.role, m.text()) for m in req.messages] == [(m.role, m.text()) for m in plain.messages]


def test_refused_values_say_what_to_send():
    for changes, says in ((dict(response_format={"type": "json_object"}), 'send {"type": "text"}'),
                          (dict(presence_penalty=1), "send 0 or leave it out"),
                          (dict(n=3), "only 1 choice is supported, got 3"),
                          (dict(stop=[1]), "a string or a list of at most 4 strings")):
        with pytest.raises(APIError, match=says):
            parse_chat_request(body(**changes))


# ---- rate limits ------------------------------------------------------------------------------
@pytest.mark.parametrize("seconds, text", [(0.391, "391ms"), (6.0, "6s"), (7.66, "7.66s"),
                                           (179.56, "2m59.56s"), (28800, "8h0m0s"), (3660.5, "1h1m0.5s"),
                                           (59.999, "1m0s"), (7199.9951, "2h0m0s"), (0.9995, "1s")])
def test_reset_durations_are_written_like_groqcloud(seconds, text):
    # the examples GroqCloud's rate-limit documentation shows for x-ratelimit-reset-*, and hours as Go writes
    # durations (its format: time.Duration's String)
    assert format_duration(seconds) == text


class Clock:
    def __init__(self):
        self.now_s = 1000.0

    def __call__(self):
        return self.now_s


def test_requests_per_minute_refill_and_retry_after():
    clock = Clock()
    limiter = RateLimiter(requests_per_minute=2, tokens_per_minute=10_000, clock=clock)
    limiter.take("k", 10, "m")
    limiter.take("k", 10, "m")
    with pytest.raises(APIError) as e:
        limiter.take("k", 10, "m")
    assert e.value.status == 429 and e.value.code == "rate_limit_exceeded" and e.value.type == "requests"
    assert "requests per minute (RPM): Limit 2, Used 2, Requested 1" in e.value.message
    # one request of 2/min comes back after 60/2 = 30 s
    assert e.value.headers["retry-after"] == "30" and "try again in 30s" in e.value.message
    clock.now_s += 30.0
    limiter.take("k", 10, "m")  # one request refilled
    limiter.take("other", 10, "m")  # keys are metered separately


def test_the_requests_headers_report_requests_per_day_as_groqcloud_does():
    """GroqCloud's x-ratelimit-*-requests headers always report the requests per day (RPD), the tokens ones the
    tokens per minute; a day's requests run out with a 429 on RPD. Without an RPD, a day of the RPM."""
    clock = Clock()
    limiter = RateLimiter(requests_per_minute=100, tokens_per_minute=10_000, clock=clock, requests_per_day=3)
    limiter.take("k", 10, "m")
    assert {h: v for h, v in limiter.headers("k").items() if h.endswith("-requests")} == {
        "x-ratelimit-limit-requests": "3", "x-ratelimit-remaining-requests": "2",
        "x-ratelimit-reset-requests": "8h0m0s"}  # a third of a day brings one request back
    limiter.take("k", 10, "m")
    limiter.take("k", 10, "m")
    with pytest.raises(APIError) as e:
        limiter.take("k", 10, "m")
    assert e.value.status == 429 and e.value.type == "requests"
    assert "requests per day (RPD): Limit 3, Used 3, Requested 1" in e.value.message
    assert e.value.headers["retry-after"] == str(24 * 3600 // 3)  # a third of a day: one request back
    unset = RateLimiter(requests_per_minute=100, tokens_per_minute=10_000, clock=clock)
    assert unset.headers("k")["x-ratelimit-limit-requests"] == str(100 * 24 * 60)
    assert unset.headers("k")["x-ratelimit-limit-tokens"] == "10000"


def test_tokens_per_minute_and_oversized_request():
    clock = Clock()
    limiter = RateLimiter(requests_per_minute=100, tokens_per_minute=600, clock=clock)
    with pytest.raises(APIError) as e:
        limiter.take("k", 601, "m")  # more than a whole minute's budget can never pass: 413
    assert e.value.status == 413 and "Limit 600, Requested 601" in e.value.message
    limiter.take("k", 500, "m")
    limiter.settle_tokens("k", charged=500, used=550)  # the real count replaces the estimate
    assert limiter.headers("k")["x-ratelimit-remaining-tokens"] == "50"
    with pytest.raises(APIError) as e:
        limiter.take("k", 110, "m")
    # 60 tokens missing at 600/60 = 10 tokens per second
    assert e.value.status == 429 and e.value.type == "tokens" and "try again in 6s" in e.value.message


def test_per_key_limits_and_keys_file(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text("# team keys\nalpha\n\nbeta rpm=1 tpm=500\ngamma rpd=7\n")
    keys = load_keys_file(path)
    assert keys == {"alpha": KeyLimits(), "beta": KeyLimits(1, 500), "gamma": KeyLimits(requests_per_day=7)}
    limiter = RateLimiter(50, 5000, keys, clock=Clock())
    assert limiter.headers("alpha")["x-ratelimit-limit-requests"] == str(50 * 24 * 60)
    assert limiter.headers("beta")["x-ratelimit-limit-requests"] == str(1 * 24 * 60)  # a day of its own RPM
    assert limiter.headers("beta")["x-ratelimit-limit-tokens"] == "500"
    assert limiter.headers("gamma")["x-ratelimit-limit-requests"] == "7"
    for bad in ("k rpm=0\n", "k speed=3\n", "# nothing\n"):
        path.write_text(bad)
        with pytest.raises(OpenLPUError):
            load_keys_file(path)
    with pytest.raises(OpenLPUError):
        load_keys_file(tmp_path / "missing.txt")


# ---- chat format -------------------------------------------------------------------------------
def test_gemma_turn_format_matches_the_published_layout():
    # Gemma's prompt-structure docs: turns wrapped in <start_of_turn>{user|model}\n ... <end_of_turn>\n,
    # no system role (instructions go in the first user turn), generation starts after
    # "<start_of_turn>model\n".
    text = "".join(t for t, _ in gemma_segments([("system", "Be brief."), ("user", "Hi"),
                                                 ("assistant", "Hello!"), ("user", "Bye")]))
    assert text == ("<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
                    "<start_of_turn>model\nHello!<end_of_turn>\n"
                    "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")


def test_a_final_assistant_message_is_a_prefill_the_reply_continues():
    """GroqCloud's assistant message prefilling: the model's turn is opened with the text given, not closed and
    followed by a new one; an empty one is no prefill."""
    text = "".join(t for t, _ in gemma_segments([("system", "Be brief."), ("user", "Add two numbers."),
                                                 ("assistant", "```python\n")]))
    assert text == "<start_of_turn>user\nBe brief.\n\nAdd two numbers.<end_of_turn>\n<start_of_turn>model\n```python"
    assert gemma_segments([("user", "Hi"), ("assistant", " ")]) == gemma_segments([("user", "Hi")])


@pytest.fixture(scope="module")
def tokenizer(gemma_path):
    from openlpu.runtime.tokenizer import Tokenizer

    return Tokenizer.from_gguf(gemma_path)


def test_turn_markers_are_special_tokens_but_user_text_never_is(tokenizer):
    start = tokenizer.token_to_id("<start_of_turn>")
    ids = prompt_ids(tokenizer, [("user", "say <start_of_turn> please")])
    assert ids[0] == tokenizer.bos_id
    assert ids.count(start) == 2  # the user turn and the model turn, not the typed one
    assert "say <start_of_turn> please" in tokenizer.decode(ids)


# Gemma's format written as a Jinja chat template (our own), so both paths can be compared.
GEMMA_AS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('fold me') if loop.index0 != 0 else '' }}{% endif %}"
    "{% endfor %}"
    "{% for m in messages if m['role'] != 'system' %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
    "{% if loop.first and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def test_a_template_gets_what_transformers_gives_it():
    """Loop controls, {% generation %}, a tojson keeping key order and HTML as written, and strftime_now, as
    transformers' chat template environment has them (a template using {% continue %} refused every request)."""
    import datetime

    template = ("{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}{{ m | tojson }}"
                "{% if m['role'] == 'assistant' %}{% generation %}[{{ m['content'] }}]{% endgeneration %}{% endif %}"
                "{% endfor %}{{ strftime_now('%Y') }}")
    rendered = render_template(template, [("system", "x"), ("user", "<b>&</b> é"), ("assistant", "ok")], "<bos>",
                               "<eos>")
    assert rendered == ('{"role": "user", "content": "<b>&</b> é"}{"role": "assistant", "content": "ok"}[ok]'
                        + str(datetime.date.today().year))


def test_a_chatml_template_gives_llama_cpp_pythons_prompt(smollm2_path, smollm2_reference):
    """SmolLM2's own ChatML template (which adds a system message where none is given), rendered and tokenized:
    the ids llama-cpp-python's chat completion prefills (its Jinja2ChatFormatter, special tokens parsed, no BOS
    added, as the file asks for none)."""
    from openlpu.runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(smollm2_path)
    for chat in smollm2_reference["chat_prompts"]:
        assert prompt_ids(tokenizer, [(m["role"], m["content"]) for m in chat["messages"]]) == chat["ids"]


def test_a_models_own_template_wins_and_agrees_with_the_built_in_format(tokenizer):
    from openlpu.runtime.tokenizer import SentencePieceTokenizer

    proto = tokenizer._sp.serialized_model_proto()
    templated = SentencePieceTokenizer(proto, dataclasses.replace(tokenizer.facts, chat_template=GEMMA_AS_TEMPLATE))
    conversation = [("developer", "Answer in French."), ("user", "Hello\n"), ("assistant", " Bonjour"),
                    ("user", "  How are you?\n")]
    assert prompt_ids(templated, conversation) == prompt_ids(tokenizer, conversation)
    assert prompt_ids(tokenizer, conversation) == prompt_ids(tokenizer, [(r, t.strip()) for r, t in conversation])
    with pytest.raises(APIError) as e:  # the template refuses: 422 with its message
        prompt_ids(templated, [("user", "a"), ("system", "late system message")])
    assert e.value.status == 422 and "fold me" in e.value.message
    # a prefill: the template's rendering cut after it, as the built-in format leaves the turn open, also where its
    # text recurs in the turn's closing markup ("<", "turn"); an empty one, even after an assistant message, opens
    # a new reply in both
    for prefill in ("```python\n", "<", "turn", "n", ""):
        conversation = [("user", "Add two numbers."), ("assistant", prefill)]
        assert prompt_ids(templated, conversation) == prompt_ids(tokenizer, conversation)
    assert prompt_ids(tokenizer, conversation) == prompt_ids(tokenizer, conversation[:1])
    after_a_reply = [("user", "Hi"), ("assistant", "Hello"), ("assistant", "")]
    assert prompt_ids(templated, after_a_reply) == prompt_ids(tokenizer, after_a_reply)
    assert "".join(text for text, _ in gemma_segments(after_a_reply)).endswith(
        "Hello<end_of_turn>\n<start_of_turn>model\n")
    shouting = SentencePieceTokenizer(proto, dataclasses.replace(tokenizer.facts,
                                                                 chat_template=GEMMA_AS_TEMPLATE.replace(
        "{{ m['content'] | trim }}", "{{ m['content'] | trim | upper }}")))
    with pytest.raises(APIError) as e:  # a template that rewrites the text leaves no place to continue from
        prompt_ids(shouting, [("user", "a"), ("assistant", "def")])
    assert e.value.status == 422 and "cannot be continued" in e.value.message
