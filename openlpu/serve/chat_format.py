"""Messages -> prompt token ids.

A model whose file carries a chat template (tokenizer.chat_template, Jinja) is rendered with it,
as Hugging Face transformers and llama.cpp do. The embedded Gemma 3 270M base GGUF has none, so
it gets Gemma's turn format (Gemma formatting docs, ai.google.dev/gemma/docs/core/prompt-structure):
  <start_of_turn>user\n{text}<end_of_turn>\n ... <start_of_turn>model\n
Gemma has no system role: a system (or developer) message is folded into the next user turn. User and
model turns are trimmed of surrounding whitespace, as Gemma 3's own template trims them ("Hello\n" is
"Hello"); system text is not.
In that format only the turn markers are parsed as special tokens; message text never is, so a
user cannot forge a turn by typing "<start_of_turn>".
A conversation that ends with an assistant message is a prefill, as GroqCloud takes it (its prompting
docs, "Assistant Message Prefilling"): that turn is left open and the reply continues its text (a
template's rendering is cut after it, as transformers' continue_final_message cuts it).
"""

from __future__ import annotations

import functools

from openlpu.serve.errors import APIError

GEMMA_ROLES = {"user": "user", "assistant": "model"}
PREFILL_MARK = "\x00prefill\x00"  # in a prefill's place while a template renders it (rendered last: its last copy)
SYSTEM_ROLES = ("system", "developer")


def gemma_segments(messages: list[tuple[str, str]]) -> list[tuple[str, bool]]:
    """(text, is_markup) pieces of the Gemma turn format; markup is parsed for special tokens. A final
    assistant message opens the model's turn with its text, which the reply continues."""
    prefill = messages[-1][1].strip() if messages and messages[-1][0] == "assistant" else None
    messages = messages if prefill is None else messages[:-1]
    segments: list[tuple[str, bool]] = []
    pending_system: list[str] = []
    for role, text in messages:
        if role in SYSTEM_ROLES:
            pending_system.append(text)
            continue
        text = text.strip()
        if role == "user" and pending_system:
            text = "\n\n".join(pending_system + [text])
            pending_system = []
        segments += [(f"<start_of_turn>{GEMMA_ROLES[role]}\n", True), (text, False), ("<end_of_turn>\n", True)]
    if pending_system:  # a system message with no user turn after it stands as a user turn
        segments += [("<start_of_turn>user\n", True), ("\n\n".join(pending_system), False),
                     ("<end_of_turn>\n", True)]
    segments.append(("<start_of_turn>model\n", True))
    return segments + ([(prefill, False)] if prefill else [])


def _generation_extension():
    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        """{% generation %}...{% endgeneration %}: its body, as written."""
        tags = frozenset({"generation"})

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    return Generation


@functools.lru_cache(maxsize=4)
def _compiled(template: str):
    """A model's chat template compiled once (a request renders it) in an environment as transformers makes it:
    sandboxed, with what it gives a template beyond Jinja's own: {% break %} and {% continue %}, {% generation %}
    (which marks the assistant's text for training masks: rendered as is), a tojson that keeps the keys' order and
    escapes no HTML, and the date (Llama 3.1's template writes it)."""
    import json
    from datetime import datetime

    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", _generation_extension()])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return env.from_string(template)


def render_template(template: str, messages: list[tuple[str, str]], bos_token: str, eos_token: str,
                    continue_final: bool = False) -> str:
    """A model's own Jinja chat template, rendered the way transformers does (_compiled); with
    `continue_final`, without the generation prompt and cut after the final message's text, which the reply
    continues (transformers' continue_final_message, which cuts where the text last appears: in the turn's
    closing markup, for a prefill such as "<")."""
    from jinja2 import TemplateError

    msgs = [{"role": "system" if r in SYSTEM_ROLES else r, "content": t} for r, t in messages]
    if continue_final:  # rendered in its place, so that the cut falls there, not where its text recurs in markup
        msgs[-1]["content"] = PREFILL_MARK
    try:
        text = _compiled(template).render(messages=msgs, add_generation_prompt=not continue_final,
                                          bos_token=bos_token, eos_token=eos_token)
    except TemplateError as e:  # e.g. "Conversation roles must alternate user/assistant/..."
        raise APIError(422, f"The conversation cannot be formatted for this model: {e}",
                       param="messages") from None
    if not continue_final:
        return text
    if PREFILL_MARK not in text:  # the template rewrote it: there is no place to continue from
        raise APIError(422, "The final assistant message cannot be continued: this model's chat template does not "
                            "write it as given; leave it out", param="messages")
    return text[:text.rindex(PREFILL_MARK)] + messages[-1][1].strip()


def prompt_ids(tokenizer, messages: list[tuple[str, str]]) -> list[int]:
    """Token ids the engine prefills for this conversation (BOS included)."""
    template = tokenizer.chat_template
    if template:
        bos = tokenizer.id_to_piece(tokenizer.bos_id) if tokenizer.bos_id is not None else ""
        eos = tokenizer.id_to_piece(tokenizer.eos_ids[0]) if tokenizer.eos_ids else ""
        prefill = bool(messages) and messages[-1][0] == "assistant"
        if prefill and not messages[-1][1].strip():  # an empty prefill: a new reply, as gemma_segments gives
            messages, prefill = messages[:-1], False
        text = render_template(template, messages, bos, eos, continue_final=prefill)
        # BOS where the file asks for it (llama.cpp's add_special), unless the template wrote it: a Qwen template
        # begins without one, and its file asks for none
        return tokenizer.encode(text, add_bos=tokenizer.facts.add_bos and not (bos and text.startswith(bos)),
                                parse_special=True)
    ids = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    for text, is_markup in gemma_segments(messages):
        ids += tokenizer.encode(text, add_bos=False, parse_special=is_markup)
    return ids
