"""The inference engine: continuous batching over a model, a KV cache and per-request sampling.

The model is anything with Model.forward's contract; Engine.load gives it the compiled Program's
fused executor (runtime.executor), so the text served is the text of the Program the simulated
figures are read from. Sequences join and leave between steps. One `step` is one batched forward: new sequences feed
their prompt (prefill) a chunk at a time, running ones their last token (decode); every sequence whose prompt is
all fed gets one new token. Chunks keep a long prompt from stalling the other sequences' tokens for its whole
prefill, and are the Program's own prefill waves. Text is streamed as deltas that never contain a stop string nor
the start of one.
Timestamps are host seconds from time.perf_counter().
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from openlpu.errors import OpenLPUError
from openlpu.models.spec import ModelSpec
from openlpu.runtime.kv_cache import KVCache
from openlpu.runtime.model import Model, Span
from openlpu.runtime.sampling import SamplingParams, make_generator, sample
from openlpu.runtime.tokenizer import StreamDecoder, Tokenizer

__all__ = ["Engine", "Sequence", "SamplingParams", "TokenEvent"]

DEFAULT_CONTEXT_LENGTH = 8192  # positions per sequence unless asked (the KV cache grows to this)
DEFAULT_PRECISION = "int4"  # int8 blocks, 4-bit head with float32 rescoring (see model.PRECISIONS)
DEFAULT_PREFILL_CHUNK = 256  # prompt tokens a sequence feeds per step, for a model run without a Program


@dataclass
class TokenEvent:
    seq_id: int
    token_id: int
    text: str  # new text since the previous event of this sequence
    finished: bool
    finish_reason: str | None  # "stop" (EOS or stop string) | "length" | None


@dataclass
class Sequence:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    t_start: float = 0.0
    t_first_token: float | None = None
    t_end: float | None = None
    slot: int | None = None  # KV cache slot while it holds one
    _generator: torch.Generator | None = None
    _decoder: StreamDecoder | None = None
    _held_text: str = ""  # decoded text not emitted yet: it could begin a stop string
    _fed: int = 0  # tokens already written to the KV cache

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Engine:
    def __init__(self, model: Model, tokenizer: Tokenizer, max_batch: int = 8,
                 context_length: int | None = None, prefill_chunk: int | None = None):
        """`model`: a Model, or an Executor in fused mode (then `program` is the Program it runs, whose prefill
        chunk is the default `prefill_chunk`: the most prompt tokens a sequence feeds in one step)."""
        if max_batch < 1:
            raise OpenLPUError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.tokenizer = model, tokenizer
        self.program = getattr(model, "program", None)
        if prefill_chunk is None:
            prefill_chunk = self.program.workload.chunk_tokens if self.program else DEFAULT_PREFILL_CHUNK
        if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise OpenLPUError(f"prefill_chunk must be an integer >= 1, got {prefill_chunk!r}")
        self.prefill_chunk = prefill_chunk
        self.spec: ModelSpec = model.spec
        self.model_name = self.spec.name
        self.context_length = min(context_length or model.max_positions, model.max_positions)
        self.max_batch = max_batch
        self.cache = KVCache(self.spec, max_batch, self.context_length, model.device)
        self._ids = itertools.count(1)

    @classmethod
    def load(cls, model_path: str | None = None, precision: str = DEFAULT_PRECISION, device=None,
             max_batch: int = 8, context_length: int | None = None, system="lpu-v1") -> "Engine":
        """The engine for a GGUF file (default: the embedded model): the model compiled for the LPU
        system `system` (preset name, hardware JSON file or SystemSpec) for `max_batch` users of
        `context_length` tokens, verified, and run by the Program's fused executor in `precision`."""
        from openlpu.compiler import Workload, compile_program, verify_or_raise
        from openlpu.hardware.lpu import load_system
        from openlpu.models.embedded import default_model_path
        from openlpu.models.gguf import spec_from_gguf
        from openlpu.runtime.executor import load_executor

        path = default_model_path() if model_path is None else model_path
        spec = spec_from_gguf(path)
        tokenizer = Tokenizer.from_gguf(path)  # before the compile and the load: a tokenizer it cannot use is refused
        context = min(context_length or DEFAULT_CONTEXT_LENGTH, spec.context_length)
        system = load_system(system) if isinstance(system, str) else system
        program = compile_program(spec, system, Workload(context_length=context, users=max_batch,
                                                         prompt_len=Workload.default_prompt_len(context)))
        verify_or_raise(program)
        executor = load_executor(program, path, "fused", precision, device, context, spec=spec)
        return cls(executor, tokenizer, max_batch, context)

    # ---- sequences --------------------------------------------------------------------------
    def new_sequence(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        check_fits(len(prompt_ids), params.max_tokens, self.context_length)
        bad = [t for t in prompt_ids if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise OpenLPUError(f"token id {bad[0]} is outside the vocabulary "
                               f"(0..{self.spec.vocab_size - 1})")
        seq = Sequence(next(self._ids), list(prompt_ids), params, t_start=time.perf_counter())
        seq.slot = self.cache.allocate()
        seq._generator = make_generator(params, self.model.device)
        seq._decoder = self.tokenizer.stream()
        return seq

    def release(self, seq: Sequence) -> None:
        """Give the sequence's KV cache slot back (idempotent; finished sequences already did)."""
        if seq.slot is not None:
            self.cache.release(seq.slot)
            seq.slot = None
        if not seq.finished:
            seq.finish_reason, seq.t_end = "cancelled", time.perf_counter()

    # ---- one batched forward ----------------------------------------------------------------
    def step(self, seqs: list[Sequence]) -> list[TokenEvent]:
        active = [s for s in seqs if not s.finished]
        if any(s.slot is None for s in active):
            raise OpenLPUError("a sequence without a KV cache slot cannot be stepped")
        if not active:
            return []
        tokens, spans, sampling, last_rows = [], [], [], []
        for s in active:  # a chunk of the prompt, or the last token sampled (none comes before the prompt is fed)
            prompt = len(s.prompt_ids)
            new = s.prompt_ids[s._fed:s._fed + self.prefill_chunk] if s._fed < prompt else s.output_ids[s._fed - prompt:]
            spans.append(Span(s.slot, s._fed, len(new)))
            tokens += new
            if s._fed + len(new) == prompt + len(s.output_ids):  # not in the middle of its prompt: it samples
                sampling.append(s)
                last_rows.append(len(tokens) - 1)
        logits = self.model.forward(tokens, spans, self.cache, last_rows)  # the head's rows for those alone
        for s, span in zip(active, spans):
            s._fed += span.n_tokens
        return [self._advance(s, sample(row, s.params, s._generator)) for s, row in zip(sampling, logits)]

    def _advance(self, s: Sequence, token: int) -> TokenEvent:
        now = time.perf_counter()
        s.t_first_token = s.t_first_token or now
        s.output_ids.append(token)
        eos = token in self.tokenizer.eos_ids
        text = "" if eos else s._decoder.push(token)
        reason = "stop" if eos else None
        pending = s._held_text + text
        emit, hit = _split_at_stop(pending, s.params.stop)
        if hit:
            reason, pending = "stop", ""
        elif reason is None and (len(s.output_ids) >= s.params.max_tokens
                                 or len(s.prompt_ids) + len(s.output_ids) >= self.context_length):
            reason = "length"
        if reason is not None and not hit:
            emit, pending = pending + s._decoder.flush(), ""
        elif reason is None:
            emit = pending[:len(pending) - _held_suffix(pending, s.params.stop)]
            pending = pending[len(emit):]
        s._held_text = pending
        if reason is not None:
            s.finish_reason, s.t_end = reason, now
            self.release(s)
        return TokenEvent(s.id, token, emit, reason is not None, reason)

    # ---- one sequence, streaming ------------------------------------------------------------
    def generate(self, prompt: str | list[int], params: SamplingParams | None = None
                 ) -> Iterator[TokenEvent]:
        params = params or SamplingParams()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        seq = self.new_sequence(ids, params)
        try:
            while not seq.finished:
                yield from self.step([seq])
        finally:
            self.release(seq)


def check_fits(prompt_tokens: int, max_tokens: int, context_length: int) -> None:
    if not prompt_tokens:
        raise OpenLPUError("the prompt is empty; give some text to continue")
    if prompt_tokens + max_tokens > context_length:
        raise OpenLPUError(f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the "
                           f"context length ({context_length}); shorten the prompt or lower max_tokens")


def _split_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """(text before the earliest stop string, whether one occurs)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _held_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that could begin a stop string."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                if s.startswith(text[-n:])), default=0)
