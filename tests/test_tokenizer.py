"""The GGUF tokenizer against llama.cpp's ids and text (tests/fixtures, made by llama.cpp)."""

import re

import pytest

from openlpu.errors import OpenLPUError
from openlpu.runtime.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(gemma_path):
    return Tokenizer.from_gguf(gemma_path)


def cases(reference):
    return reference["tokenizer"]["cases"]


def test_encode_equals_llama_cpp_on_every_fixture_string(tokenizer, llamacpp_reference):
    assert len(cases(llamacpp_reference)) >= 15
    for case in cases(llamacpp_reference):
        ours = tokenizer.encode(case["text"], add_bos=True, parse_special=case["special"])
        assert ours == case["ids"], repr(case["text"])


def test_prompt_ids(tokenizer, llamacpp_reference):
    assert tokenizer.encode(llamacpp_reference["prompt"]) == llamacpp_reference["prompt_token_ids"]
    assert tokenizer.encode(llamacpp_reference["prompt"], add_bos=False) == \
        llamacpp_reference["prompt_token_ids"][1:]


def test_decode_equals_llama_cpp(tokenizer, llamacpp_reference):
    assert tokenizer.decode(llamacpp_reference["greedy_32_ids"]) == llamacpp_reference["greedy_32_text"]
    for top in llamacpp_reference["next_token_top10"]:
        assert tokenizer.decode([top["id"]]) == top["piece"]
    for case in cases(llamacpp_reference):
        assert tokenizer.decode(case["ids"]) == case["detokenized"], repr(case["text"])


def test_decode_round_trips_plain_text(tokenizer, llamacpp_reference):
    for case in cases(llamacpp_reference):
        if not case["special"]:  # control tokens decode to nothing, by design
            assert tokenizer.decode(tokenizer.encode(case["text"])) == case["text"]


def test_stream_deltas_concatenate_to_the_full_decode(tokenizer, llamacpp_reference):
    for case in cases(llamacpp_reference):
        stream = tokenizer.stream()
        deltas = [stream.push(i) for i in case["ids"]]
        assert "".join(deltas) + stream.flush() == tokenizer.decode(case["ids"])
        assert all("\ufffd" not in d for d in deltas), repr(case["text"])


def test_stream_holds_back_a_split_character(tokenizer):
    # 𝔘 is not in the vocabulary: it comes out as its 4 UTF-8 bytes (byte fallback)
    ids = tokenizer.encode("𝔘", add_bos=False)
    assert [tokenizer.token_bytes(i) for i in ids] == list(map(bytes, [[b] for b in "𝔘".encode()]))
    stream = tokenizer.stream()
    assert [stream.push(i) for i in ids] == ["", "", "", "𝔘"]
    stream.push(ids[0])  # a dangling lead byte ends as a replacement character
    assert stream.flush() == "\ufffd"


def test_vocabulary_facts(tokenizer):
    assert tokenizer.vocab_size == 262144
    assert tokenizer.bos_id == tokenizer.token_to_id("<bos>") == 2
    assert set(tokenizer.eos_ids) == {tokenizer.token_to_id("<eos>"), tokenizer.token_to_id("<end_of_turn>")}
    assert tokenizer.decode([tokenizer.bos_id]) == ""
    assert tokenizer.chat_template is None  # this GGUF carries none
    with pytest.raises(OpenLPUError, match="not in the vocabulary"):
        tokenizer.token_to_id("no such piece")
    with pytest.raises(OpenLPUError, match="out of range"):
        tokenizer.decode([tokenizer.vocab_size])


def test_cached_tokenizer_equals_a_fresh_build(gemma_path, tokenizer, llamacpp_reference):
    fresh = Tokenizer.from_gguf(gemma_path, cache=False)
    assert fresh.facts == tokenizer.facts
    for case in cases(llamacpp_reference):
        assert fresh.encode(case["text"]) == tokenizer.encode(case["text"])


def test_missing_model_file(tmp_path):
    with pytest.raises(OpenLPUError, match="not found"):
        Tokenizer.from_gguf(tmp_path / "nope.gguf")


@pytest.mark.parametrize("metadata, says", [
    ({}, ("the file carries no tokenizer (no tokenizer.ggml.model in its metadata); give a GGUF file with its "
          "tokenizer")),
    ({"tokenizer.ggml.model": "gpt2"}, "tokenizer 'gpt2' is not supported (supported: llama)"),
])
def test_a_gguf_without_a_supported_tokenizer_is_refused(tmp_path, metadata, says):
    import gguf

    writer = gguf.GGUFWriter(tmp_path / "m.gguf", "gemma3")
    for key, value in metadata.items():
        writer.add_string(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(OpenLPUError, match=re.escape(says)):
        Tokenizer.from_gguf(tmp_path / "m.gguf", cache=False)
