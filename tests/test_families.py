"""Every family: OpenLPU's Model against Hugging Face transformers on the same tiny random weights.

transformers builds each model (2 layers, small dims; see fixtures/tiny_models/hf_tiny.py) and
saves it as config.json + safetensors; OpenLPU loads that folder with spec_from_hf_config and
load_safetensors and runs it in float32. Logits must agree at every position of a 32-token
sequence, without and with the KV cache (prefill longer than the sliding windows, then one token
at a time), greedy generation must give the same ids, and Mixtral and Qwen3-MoE must route every
token to the same experts as transformers' router.
"""

import functools
from pathlib import Path

import pytest
import torch

from fixtures.tiny_models.hf_tiny import TINY_FAMILIES, build, save
from openlpu.models.hf import HF_ADJACENT_ROPE_FAMILIES, load_safetensors, spec_from_hf_config
from openlpu.runtime.kv_cache import KVCache
from openlpu.runtime.model import ROPE_STYLE, Model, Span, hf_qk_to_gguf

SEQ_LEN, PREFILL, PROMPT, NEW_TOKENS = 32, 20, 8, 16
TOL = dict(rtol=1e-4, atol=1e-4)  # float32, two layers: observed differences are ~1e-6


def runtime_weights(spec, hf_weights: dict) -> dict:
    """HF-layout weights -> Model's layout: interleaved-rope families need llama.cpp's q/k row order, which
    the HF rows of HF_ADJACENT_ROPE_FAMILIES (Llama 4) already have."""
    if ROPE_STYLE[spec.family] != "interleaved" or spec.family in HF_ADJACENT_ROPE_FAMILIES:
        return hf_weights
    out = dict(hf_weights)
    for i in range(spec.n_layers):
        out[f"blk.{i}.attn_q.weight"] = hf_qk_to_gguf(out[f"blk.{i}.attn_q.weight"], spec.n_heads)
        out[f"blk.{i}.attn_k.weight"] = hf_qk_to_gguf(out[f"blk.{i}.attn_k.weight"], spec.n_kv_heads)
    return out


@functools.cache
def make_pair(family: str, tmp_root: str):
    """(transformers model, OpenLPU Model, token ids) on the same weights."""
    hf = build(family)
    folder = save(hf, Path(tmp_root) / family)
    spec = spec_from_hf_config(folder)
    ours = Model(spec, runtime_weights(spec, load_safetensors(folder, spec)), precision="float32")
    ids = torch.randint(0, spec.vocab_size, (SEQ_LEN,), generator=torch.Generator().manual_seed(1))
    return hf, ours, ids


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("families"))


@pytest.fixture(params=sorted(TINY_FAMILIES))
def pair(request, tmp_root):
    return make_pair(request.param, tmp_root)


def hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids[None]).logits[0].float()


def test_logits_without_cache(pair):
    hf, ours, ids = pair
    expected = hf_logits(hf, ids)
    assert expected.std() > 0.5  # logits with real spread, not a flat distribution
    torch.testing.assert_close(ours.logits(ids.tolist()), expected, **TOL)


def test_logits_with_cache(pair):
    """Prefill 20 tokens (longer than the 8-token sliding windows), then decode one at a time."""
    hf, ours, ids = pair
    cache = KVCache(ours.spec, n_slots=2, capacity=64)
    cache.allocate()  # slot 0 stays empty: the sequence lives in slot 1
    slot = cache.allocate()
    parts = [ours.forward(ids[:PREFILL], [Span(slot, 0, PREFILL)], cache)]
    for p in range(PREFILL, SEQ_LEN):
        parts.append(ours.forward(ids[p:p + 1], [Span(slot, p, 1)], cache))
    torch.testing.assert_close(torch.cat(parts), hf_logits(hf, ids), **TOL)


def greedy(model: Model, prompt: list[int], n_new: int) -> list[int]:
    cache = KVCache(model.spec, n_slots=1, capacity=64)
    slot = cache.allocate()
    logits = model.forward(prompt, [Span(slot, 0, len(prompt))], cache, logit_rows=[len(prompt) - 1])
    out = [int(logits[-1].argmax())]
    while len(out) < n_new:
        pos = len(prompt) + len(out) - 1
        out.append(int(model.forward([out[-1]], [Span(slot, pos, 1)], cache)[-1].argmax()))
    return out


def test_greedy_generation_matches(pair):
    hf, ours, ids = pair
    prompt = ids[:PROMPT]
    with torch.no_grad():
        expected = hf.generate(prompt[None], max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                               do_sample=False, pad_token_id=0)[0, PROMPT:].tolist()
    assert greedy(ours, prompt.tolist(), NEW_TOKENS) == expected


@pytest.mark.parametrize("family", ["mixtral", "qwen3-moe"])
def test_moe_routing_matches_token_by_token(tmp_root, family):
    hf, ours, ids = make_pair(family, tmp_root)
    k = ours.spec.n_experts_per_token
    hf_choice, our_logits, hooks = {}, {}, []
    for i, layer in enumerate(hf.model.layers):  # transformers' router returns (logits, scores, indices)
        hooks.append(layer.mlp.gate.register_forward_hook(
            lambda mod, inp, out, i=i: hf_choice.__setitem__(i, out[2])))
    routers = [blk.router for blk in ours.blocks]
    for i, blk in enumerate(ours.blocks):  # record the router logits OpenLPU computes
        blk.router = lambda h, i=i: our_logits.setdefault(i, routers[i](h))
    try:
        hf_logits(hf, ids)
        ours.logits(ids.tolist())
    finally:
        for hook in hooks:
            hook.remove()
        for blk, router in zip(ours.blocks, routers):
            blk.router = router
    for i in range(ours.spec.n_layers):
        ours_top = our_logits[i].topk(k, -1).indices.sort(-1).values
        assert ours_top.shape == (SEQ_LEN, k)
        assert torch.equal(ours_top, hf_choice[i].sort(-1).values), f"layer {i}"
    assert len(hf_choice[0].unique()) > k  # tokens spread over several experts: a real test
