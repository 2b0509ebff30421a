"""Engine behaviour on the embedded model: sampling invariants, stop strings, continuous
batching, slot accounting and bad input."""

import pytest
import torch

from openlpu.errors import OpenLPUError
from openlpu.runtime.engine import Engine, SamplingParams
from openlpu.runtime.sampling import make_generator, sample

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def engine(gemma_path):
    return Engine.load(str(gemma_path), max_batch=3, context_length=256)


def run(engine, prompt=PROMPT, **params):
    events = list(engine.generate(prompt, SamplingParams(**params)))
    return "".join(e.text for e in events), [e.token_id for e in events], events[-1]


def test_greedy_matches_llamacpp(engine, llamacpp_reference):
    text, ids, last = run(engine, max_tokens=8, temperature=0)
    assert ids == llamacpp_reference["greedy_32_ids"][:8]
    assert text == engine.tokenizer.decode(ids)
    assert last.finished and last.finish_reason == "length"
    assert engine.cache.free_slots == engine.max_batch  # generate gave its slot back


def test_seed_reproduces_and_seeds_differ(engine):
    a = run(engine, max_tokens=12, temperature=1.0, seed=7)[1]
    assert run(engine, max_tokens=12, temperature=1.0, seed=7)[1] == a
    others = [run(engine, max_tokens=12, temperature=1.0, seed=s)[1] for s in (8, 9)]
    assert any(o != a for o in others)


def test_top_k_one_and_tiny_top_p_are_greedy(engine):
    greedy = run(engine, max_tokens=10, temperature=0)[1]
    assert run(engine, max_tokens=10, temperature=1.5, top_k=1, seed=1)[1] == greedy
    assert run(engine, max_tokens=10, temperature=1.5, top_p=1e-6, seed=2)[1] == greedy


def test_extreme_sampling_values_still_draw_a_token():
    """A temperature near 0 overflowed the scaled logits, and a top_p below float32's smallest masked the top
    token: both raised inside a batched step; one that float32 holds as 0 (1e-50) divided the logits into NaN.
    They now tend to greedy, as top_p 0 is by definition."""
    logits = torch.randn(262_144, generator=torch.Generator().manual_seed(0)) * 30
    g = torch.Generator().manual_seed(1)
    # 1e-30 and 1.2e-38 divide the shifted logits (float32 holds them); 1e-45 and below are greedy outright
    for params in (dict(temperature=1e-30), dict(temperature=1.2e-38), dict(temperature=1e-45),
                   dict(temperature=1e-50), dict(temperature=1e-300), dict(top_p=1e-300), dict(top_p=0),
                   dict(temperature=2.0, top_p=0)):
        assert sample(logits, SamplingParams(**params), g) == int(logits.argmax()), params


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_logits_not_finite_are_refused_in_words(bad):
    """A corrupt file's NaN weights made NaN logits: greedy decoding picked the NaN's id as if it were a token, and
    sampling raised torch's own error (a review found the traceback). Each now says what is wrong."""
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    logits[17] = bad
    for params in (SamplingParams(), SamplingParams(temperature=0.7, seed=1), SamplingParams(temperature=1, top_p=0.5)):
        with pytest.raises(OpenLPUError, match="logits that are not finite numbers"):
            sample(logits, params, make_generator(params))


def test_sampling_respects_top_k_set():
    logits = torch.tensor([0.0, 5.0, 4.0, 3.0, -1.0])
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, SamplingParams(temperature=2.0, top_k=2), g) for _ in range(200)}
    assert draws == {1, 2}
    draws = {sample(logits, SamplingParams(temperature=2.0, top_p=0.5), g) for _ in range(200)}
    assert draws <= {1, 2} and 1 in draws


def test_stop_string_is_excluded_and_ends_generation(engine):
    full, _, _ = run(engine, max_tokens=24, temperature=0)
    # llama.cpp's greedy text begins " the capital of the country of France. It is the ..."; the
    # token after "the" is a near-tie (0.014 logits apart in float32), so stop before it
    stop = "It is"
    assert stop in full
    text, _, last = run(engine, max_tokens=24, temperature=0, stop=("nowhere-to-be-seen", stop))
    assert text == full[:full.index(stop)]
    assert last.finish_reason == "stop" and stop not in text


def test_continuous_batching_equals_separate_runs(engine):
    prompts = [PROMPT, "Once upon a time", "def fibonacci(n):"]
    separate = [run(engine, p, max_tokens=6, temperature=0)[1] for p in prompts]
    params = SamplingParams(max_tokens=6, temperature=0)
    seqs = [engine.new_sequence(engine.tokenizer.encode(prompts[0]), params)]
    engine.step(seqs)
    engine.step(seqs)  # the second sequence joins while the first is decoding
    seqs.append(engine.new_sequence(engine.tokenizer.encode(prompts[1]), params))
    engine.step(seqs)
    seqs.append(engine.new_sequence(engine.tokenizer.encode(prompts[2]), params))
    while not all(s.finished for s in seqs):
        engine.step(seqs)
    assert [s.output_ids for s in seqs] == separate
    assert all(s.t_start <= s.t_first_token <= s.t_end for s in seqs)
    assert engine.cache.free_slots == engine.max_batch


def test_a_long_prompt_is_fed_in_chunks_beside_a_decoding_sequence(engine, llamacpp_reference):
    """Fed two tokens a step, a long prompt takes several steps, and the sequence already decoding gets a token
    in each of them; both give the tokens they give alone, the short one llama.cpp's."""
    chunked = Engine(engine.model, engine.tokenizer, 2, 256, prefill_chunk=2)
    long_ids = engine.tokenizer.encode("Once upon a time, in a small village by the sea, there lived an old man")
    short_alone, long_alone = (run(engine, ids, max_tokens=16, temperature=0)[1] for ids in (PROMPT, long_ids))
    params = SamplingParams(max_tokens=16, temperature=0)
    short = chunked.new_sequence(engine.tokenizer.encode(PROMPT), params)
    while not short.output_ids:
        chunked.step([short])
    long = chunked.new_sequence(long_ids, params)
    feeding_steps = 0
    while not long.output_ids:
        events = chunked.step([short, long])
        assert [e.seq_id for e in events] == [short.id] or long.output_ids  # a token for the short one each step
        feeding_steps += 1
    assert feeding_steps == -(-len(long_ids) // 2) > 4
    while not (short.finished and long.finished):
        chunked.step([short, long])
    assert short.output_ids == short_alone and short_alone[:8] == llamacpp_reference["greedy_32_ids"][:8]
    assert long.output_ids == long_alone
    assert chunked.cache.free_slots == 2


def test_a_prompt_chunk_that_samples_nothing_computes_no_logits(engine):
    """Each step ran the head (Gemma 3's 262,144-token vocabulary) for every sequence, a prompt's chunks before
    its last too, and dropped their logits: only the sequences that sample get a row of it."""
    rows = []

    class CountingRows:
        def __init__(self, model):
            self.model = model

        def forward(self, tokens, spans, cache, logit_rows):
            rows.append(len(logit_rows))
            return self.model.forward(tokens, spans, cache, logit_rows)

        def __getattr__(self, name):
            return getattr(self.model, name)

    chunked = Engine(CountingRows(engine.model), engine.tokenizer, 1, 256, prefill_chunk=2)
    ids = engine.tokenizer.encode("Once upon a time, in a small")
    seq = chunked.new_sequence(ids, SamplingParams(max_tokens=3, temperature=0))
    while not seq.finished:
        chunked.step([seq])
    chunks = -(-len(ids) // 2)
    assert rows == [0] * (chunks - 1) + [1, 1, 1] and chunks > 2
    assert seq.output_ids == run(engine, ids, max_tokens=3, temperature=0)[1]


def test_release_frees_the_slot_at_once(engine):
    params = SamplingParams(max_tokens=50, temperature=0)
    seqs = [engine.new_sequence([2, 818], params) for _ in range(engine.max_batch)]
    with pytest.raises(OpenLPUError, match="slots"):
        engine.new_sequence([2, 818], params)
    engine.step(seqs)
    engine.release(seqs[0])
    assert engine.cache.free_slots == 1
    engine.release(seqs[0])  # idempotent
    assert engine.step(seqs[:1]) == []  # a released sequence is done
    for s in seqs[1:]:
        engine.release(s)
    assert engine.cache.free_slots == engine.max_batch


@pytest.mark.parametrize("params", [
    dict(temperature=-0.1), dict(temperature=2.5), dict(top_p=-0.1), dict(top_p=1.5),
    dict(top_k=-1), dict(max_tokens=0), dict(stop=("a", "b", "c", "d", "e")), dict(stop=("",)),
    dict(seed="x"), dict(seed=2**64), dict(seed=-(2**63) - 1),
])
def test_invalid_sampling_values(params):
    with pytest.raises(OpenLPUError):
        SamplingParams(**params)


def test_bad_prompts(engine):
    with pytest.raises(OpenLPUError, match="empty"):
        engine.new_sequence([], SamplingParams())
    with pytest.raises(OpenLPUError, match="context length"):
        engine.new_sequence([2] * 200, SamplingParams(max_tokens=100))
    with pytest.raises(OpenLPUError, match="vocabulary"):
        engine.new_sequence([2, 10**7], SamplingParams(max_tokens=8))
    assert engine.cache.free_slots == engine.max_batch
