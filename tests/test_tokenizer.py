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


def test_vocabulary_facts(tokenizer, llamacpp_reference):
    assert tokenizer.vocab_size == 262144
    assert tokenizer.bos_id == tokenizer.token_to_id("<bos>") == 2
    # llama.cpp ends generation on <eos>, <end_of_turn> and </s> (a review found </s> printed and run past)
    assert set(tokenizer.eos_ids) == set(llamacpp_reference["end_of_generation_ids"]) == {
        tokenizer.token_to_id(p) for p in ("<eos>", "<end_of_turn>", "</s>")}
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
    ({"tokenizer.ggml.model": "bert"}, "tokenizer 'bert' is not supported (supported: llama, gpt2)"),
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


def _vocabulary_gguf(path, drop=(), **metadata):
    """A llama GGUF with a small SentencePiece vocabulary written as llama.cpp's converter writes it."""
    import gguf

    pieces = ["<unk>", "<s>", "</s>", "\u2581a", "b"]
    fields = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": pieces,
              "tokenizer.ggml.scores": [0.0] * len(pieces), "tokenizer.ggml.token_type": [2, 3, 3, 1, 1],
              "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.bos_token_id": 1,
              "tokenizer.ggml.eos_token_id": 2, **metadata}
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in fields.items():
        if key not in drop:
            kind = {str: gguf.GGUFValueType.STRING, int: gguf.GGUFValueType.UINT32}.get(type(value),
                                                                                    gguf.GGUFValueType.ARRAY)
            writer.add_key_value(key, value, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("damage", ["facts.json", "tokenizer.model"])
def test_a_damaged_cache_entry_is_built_again(tmp_path, monkeypatch, damage):
    """A cache file cut short (a crash, a full disk) was read as it was, a traceback on every later run (a review
    found it): it is built again from the file, as a missing one is."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = _vocabulary_gguf(tmp_path / "ok.gguf")
    built = Tokenizer.from_gguf(path)
    (entry,) = (tmp_path / "cache" / "openlpu" / "tokenizers").iterdir()
    (entry / damage).write_bytes((entry / damage).read_bytes()[:7])
    again = Tokenizer.from_gguf(path)
    assert again.facts == built.facts and again.encode("ab") == built.encode("ab") == [1, 3, 4]
    assert Tokenizer.from_gguf(path, cache=False).facts == Tokenizer.from_gguf(path).facts  # and cached again


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3"])
def test_a_gemma_turn_ends_at_end_of_turn(tmp_path, arch):
    """Every Gemma's instruct turn ends with <end_of_turn>, which llama.cpp counts as ending generation; Gemma 1
    (llama.cpp's arch gemma) was left out when the loader took its files (a review found it)."""
    import gguf

    pieces = ["<unk>", "<s>", "</s>", "<end_of_turn>", "\u2581a", "b"]
    writer = gguf.GGUFWriter(tmp_path / "g.gguf", arch)
    for key, value, kind in (("tokenizer.ggml.model", "llama", gguf.GGUFValueType.STRING),
                             ("tokenizer.ggml.tokens", pieces, gguf.GGUFValueType.ARRAY),
                             ("tokenizer.ggml.scores", [0.0] * 6, gguf.GGUFValueType.ARRAY),
                             ("tokenizer.ggml.token_type", [2, 3, 3, 3, 1, 1], gguf.GGUFValueType.ARRAY),
                             ("tokenizer.ggml.unknown_token_id", 0, gguf.GGUFValueType.UINT32),
                             ("tokenizer.ggml.eos_token_id", 1, gguf.GGUFValueType.UINT32)):
        writer.add_key_value(key, value, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    assert 3 in Tokenizer.from_gguf(tmp_path / "g.gguf", cache=False).eos_ids


def test_a_small_vocabulary_builds(tmp_path):
    tok = Tokenizer.from_gguf(_vocabulary_gguf(tmp_path / "ok.gguf"), cache=False)
    assert tok.vocab_size == 5 and tok.encode("ab") == [1, 3, 4]  # <s>, "\u2581a", "b"


def test_a_special_id_no_token_has_is_left_out_as_llama_cpp_leaves_it(tmp_path):
    """llama.cpp's vocabulary loader warns of a special id past the token list ('bad special token') and loads the
    file without it; real files name a padding id one past their tokens. The tokenizer builds, without it."""
    tok = Tokenizer.from_gguf(_vocabulary_gguf(tmp_path / "pad.gguf", **{"tokenizer.ggml.padding_token_id": 5,
                                                                         "tokenizer.ggml.eos_token_id": 7}),
                              cache=False)
    assert tok.encode("ab") == [1, 3, 4] and 7 not in tok.eos_ids


@pytest.mark.parametrize("drop, metadata, says", [
    (("tokenizer.ggml.tokens",), {}, "has tokenizer metadata but no token list (tokenizer.ggml.tokens)"),
    # an unknown token no token is: left out, as llama.cpp leaves it, and sentencepiece needs one (an IndexError)
    ((), {"tokenizer.ggml.unknown_token_id": 999}, "tokenizer has no unknown token"),
    ((), {"tokenizer.ggml.token_type": [1, 1]}, "tokenizer.ggml.token_type holds 2 entries for 5 tokens"),
    # the model would emit ids 5..9, which have no piece (llama.cpp: n_vocab is the token list's length)
    ((), {"llama.vocab_size": 10}, "llama.vocab_size = 10 differs from the token list's 5 entries"),
])
def test_a_broken_vocabulary_is_one_line_at_load(tmp_path, drop, metadata, says):
    with pytest.raises(OpenLPUError, match=re.escape(says)):
        Tokenizer.from_gguf(_vocabulary_gguf(tmp_path / "m.gguf", drop, **metadata), cache=False)


def test_engine_refuses_an_unsupported_tokenizer_before_compiling(tmp_path, monkeypatch):
    """serve: a GGUF of a tokenizer it cannot use (a BERT WordPiece one) is refused in a moment, not after a compile
    and a load."""
    import openlpu.compiler
    from openlpu.runtime.engine import Engine
    from tests.test_gguf import TINY, arch_metadata, write_gguf

    def compile_program(*args, **kwargs):
        raise AssertionError("compiled before checking the tokenizer")

    monkeypatch.setattr(openlpu.compiler, "compile_program", compile_program)
    path = write_gguf(tmp_path / "wordpiece.gguf", "llama", {**arch_metadata("llama", **TINY),
                                                             "tokenizer.ggml.model": "bert"}, {})
    with pytest.raises(OpenLPUError, match=re.escape("tokenizer 'bert' is not supported")):
        Engine.load(str(path))


# ---- a byte-level BPE vocabulary: SmolLM2-135M-Instruct against llama.cpp -------------------------------------
@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_path):
    return Tokenizer.from_gguf(smollm2_path)


def test_byte_level_bpe_encodes_and_decodes_as_llama_cpp(smollm2_tokenizer, smollm2_reference):
    """Every fixture string (unicode, emoji, runs of spaces, CRLF, code, digits, text spelling special tokens),
    with the file's BOS rule (SmolLM2 adds none) and with special tokens parsed or not: llama.cpp's ids; and
    their pieces' bytes, llama.cpp's text."""
    tokenizer, reference = smollm2_tokenizer, smollm2_reference
    assert tokenizer.facts.add_bos is False and len(cases(reference)) >= 20
    for case in cases(reference):
        assert tokenizer.encode(case["text"], parse_special=case["special"]) == case["ids"], repr(case["text"])
        assert tokenizer.decode(case["ids"]) == case["detokenized"], repr(case["text"])
    assert tokenizer.encode(reference["prompt"]) == reference["prompt_token_ids"]
    assert tokenizer.decode(reference["greedy_32_ids"]) == reference["greedy_32_text"]
    for top in reference["next_token_top10"]:
        assert tokenizer.decode([top["id"]]) == top["piece"]
    assert list(tokenizer.eos_ids) == reference["end_of_generation_ids"]  # <|endoftext|>, <|im_end|>, <reponame>


@pytest.mark.parametrize("pre", ["default", "gpt-2", "llama-bpe", "qwen2", "gpt-4o", "tekken"])
def test_each_byte_level_pre_tokenizer_splits_as_llama_cpp(smollm2_path, smollm2_reference, pre, tmp_path):
    """SmolLM2's vocabulary under another family's pre-tokenizer (a metadata-only copy naming it): a file naming
    none's punctuation first, GPT-2's spaces before words, Llama 3's digits in threes and contractions in any
    case, Qwen's digits one by one, gpt-oss's and Mistral Nemo's case changes: on the fixture strings and 100 drawn
    at random, the ids llama.cpp gives the same copy."""
    from tests.fixtures.models import vocabulary_only_gguf

    tokenizer = Tokenizer.from_gguf(vocabulary_only_gguf(smollm2_path, tmp_path / f"{pre}.gguf", pre))
    for case in smollm2_reference["other_pre_tokenizers"][pre]:
        assert tokenizer.encode(case["text"], parse_special=case["special"]) == case["ids"], repr(case["text"])
    # not a check the vocabulary alone passes: each splits some strings into other ids than SmolLM2's own does
    own = {case["text"]: case["ids"] for case in cases(smollm2_reference) if not case["special"]}
    assert any(own[case["text"]] != case["ids"] for case in smollm2_reference["other_pre_tokenizers"][pre])


def test_user_defined_tokens_are_matched_longest_first_everywhere_as_llama_cpp(smollm2_path, smollm2_reference,
                                                                             tmp_path):
    """Tokens a converter types user-defined are matched in any text, special tokens parsed or not, each the
    longest first across the whole text before a shorter one (llama.cpp's partition): "they" with "hey" and "th"
    user-defined is "t" + "hey"; one alternation of all of them took "th" + "ey" (a review)."""
    from tests.fixtures.models import vocabulary_only_gguf

    reference = smollm2_reference["user_defined"]
    copy = vocabulary_only_gguf(smollm2_path, tmp_path / "user-defined.gguf", user_defined=tuple(reference["pieces"]))
    tokenizer = Tokenizer.from_gguf(copy, cache=False)
    for case in reference["cases"]:
        assert tokenizer.encode(case["text"], parse_special=case["special"]) == case["ids"], repr(case["text"])
        assert tokenizer.decode(case["ids"]) == case["detokenized"]
    assert tokenizer.encode("they") == [tokenizer.token_to_id("t"), tokenizer.token_to_id("hey")]


def test_byte_level_stream_holds_back_a_split_character(smollm2_tokenizer):
    """An emoji SmolLM2 spells in several byte-level tokens comes out whole, once its last byte arrives."""
    ids = smollm2_tokenizer.encode("🙂")
    assert len(ids) > 1 and b"".join(smollm2_tokenizer.token_bytes(i) for i in ids) == "🙂".encode()
    stream = smollm2_tokenizer.stream()
    deltas = [stream.push(i) for i in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == "🙂"


@pytest.mark.parametrize("edit, says", [
    ({"tokenizer.ggml.pre": "chameleon"}, "byte-level BPE pre-tokenizer 'chameleon' is not one OpenLPU knows"),
    ({"tokenizer.ggml.merges": None}, "has no list of merges (tokenizer.ggml.merges"),
])
def test_a_byte_level_vocabulary_it_cannot_split_is_refused(smollm2_path, tmp_path, edit, says):
    """A pre-tokenizer OpenLPU has no expressions for would split text otherwise than the model was trained on,
    and merges are what byte-level BPE encodes with: each is refused by name, not guessed."""
    import gguf

    from tests.fixtures.models import vocabulary_only_gguf

    copy = vocabulary_only_gguf(smollm2_path, tmp_path / "copy.gguf", edit.get("tokenizer.ggml.pre"))
    if "tokenizer.ggml.merges" in edit:  # the copy again, without its merges
        reader, writer = gguf.GGUFReader(copy), gguf.GGUFWriter(tmp_path / "nomerges.gguf", "llama")
        for field in reader.fields.values():
            if not field.name.startswith("GGUF.") and field.name not in ("general.architecture",
                                                                           "tokenizer.ggml.merges"):
                kind = field.types[0]
                writer.add_key_value(field.name, field.contents(), kind,
                                     sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()
        copy = tmp_path / "nomerges.gguf"
    with pytest.raises(OpenLPUError, match=re.escape(says)):
        Tokenizer.from_gguf(copy, cache=False)
