"""Tokenizer built from a GGUF's own vocabulary, agreeing with llama.cpp token for token.

Two kinds of vocabulary, by the file's tokenizer.ggml.model:
- "llama" (SentencePiece BPE: Gemma, Llama 2, Mistral): sentencepiece's BPE over a ModelProto assembled from the
  GGUF's tokens, scores and token types, cached under the OpenLPU cache keyed on the GGUF's identity;
- "gpt2" (byte-level BPE: Llama 3, Qwen, SmolLM): the text split by its pre-tokenizer's regular expressions
  (BPE_PRE_TOKENIZERS, by tokenizer.ggml.pre), each piece's UTF-8 bytes written as GPT-2's printable stand-ins
  (BYTE_TO_CHAR) and merged pair by pair in the order of tokenizer.ggml.merges.
Decoding maps each id to its bytes the way llama.cpp's token_to_piece does (escaped spaces back to " ", byte
tokens and stand-ins to their bytes, control tokens to nothing), so streaming can decode bytes incrementally.
"""

from __future__ import annotations

import codecs
import hashlib
import heapq
import json
import os
from dataclasses import dataclass
from pathlib import Path

from openlpu.errors import OpenLPUError

SPACE_ESCAPE = "\u2581"  # sentencepiece's visible space "▁"
# GGUF token types (llama.cpp llama_token_type) use sentencepiece's piece-type numbering.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SUPPORTED_TOKENIZER_MODELS = ("llama", "gpt2")  # llama.cpp's names for SentencePiece and byte-level BPE
# Extra stop pieces per architecture, which llama.cpp's vocab loader (src/llama-vocab.cpp) counts as ending
# generation and types as control tokens (so they match in text only as special tokens, and print nothing): chat
# models end a turn with <end_of_turn>; the embedded Gemma 3's </s>, a user-defined token in the file, is one too
# (llama_vocab_is_eog, llama-cpp-python 0.3.36: ids 1, 106, 212; tests/fixtures/gemma-3-270m-llamacpp.json).
END_OF_TURN_PIECES = {"gemma3": ("<end_of_turn>", "</s>"), "gemma2": ("<end_of_turn>",), "gemma": ("<end_of_turn>",)}
CACHE_FORMAT_VERSION = 5  # 4: end-of-turn pieces typed control, <unk> a special piece; 5: Gemma 1's <end_of_turn>
# The special token ids a vocabulary names (llama.cpp's LLM_KV_TOKENIZER_*_ID keys)
SPECIAL_ID_KEYS = ("tokenizer.ggml.unknown_token_id", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                   "tokenizer.ggml.padding_token_id", "tokenizer.ggml.eot_token_id")
# What run and serve take, for the refusal of another tokenizer
RUNNABLE = ("`openlpu run` and `serve` take GGUF files with a SentencePiece tokenizer (Gemma, Llama 2, Mistral...) "
            "or a byte-level BPE one of a pre-tokenizer OpenLPU knows (Llama 3, Qwen 2 and 3, gpt-oss, SmolLM...); "
            "`openlpu plan` and `compile` read any supported architecture")

# Byte-level BPE pre-tokenizers: llama.cpp's tokenizer.ggml.pre -> (the regular expressions that split the text,
# one after another, each splitting the pieces the last left; whether a piece that is itself a token skips the
# merges). The expressions are those of each model's tokenizer.json pre_tokenizer, as llama.cpp's
# llama_vocab::impl::load (src/llama-vocab.cpp) keeps them per pre-tokenizer type.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # digits one by one
# GPT-4o's o200k (gpt-oss): words split at case changes, each with a contraction after it, digits in threes, "/"
# kept after punctuation; Mistral Nemo's tekken: the same without contractions, digits one by one
UPPER, LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
NOT_WORD = r"[^\r\n\p{L}\p{N}]?"
CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
REST = r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
O200K_SPLIT = (f"{NOT_WORD}{UPPER}*{LOWER}+{CONTRACTION}|{NOT_WORD}{UPPER}+{LOWER}*{CONTRACTION}"
               + r"|\p{N}{1,3}" + REST)
TEKKEN_SPLIT = f"{NOT_WORD}{UPPER}*{LOWER}+|{NOT_WORD}{UPPER}+{LOWER}*" + r"|\p{N}" + REST
BPE_PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    # a file naming none: punctuation first, then GPT-2's, then digits in threes
    "default": ((r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]"), False),
    "gpt-2": ((GPT2_SPLIT,), False),
    "smollm": ((r"\p{N}", GPT2_SPLIT), False),  # SmolLM, SmolLM2: digits one by one, then GPT-2's
    "llama-bpe": ((LLAMA3_SPLIT,), True),  # Llama 3, 3.1, 3.2, 3.3 (and the names below)
    "llama3": ((LLAMA3_SPLIT,), True),
    "llama-v3": ((LLAMA3_SPLIT,), True),
    "qwen2": ((QWEN2_SPLIT,), False),  # Qwen 2, 2.5, 3
    "deepseek-r1-qwen": ((QWEN2_SPLIT,), False),
    "gpt-4o": ((O200K_SPLIT,), False),  # gpt-oss
    "tekken": ((TEKKEN_SPLIT,), False),  # Mistral Nemo, Pixtral
}


def _byte_to_char() -> tuple[str, ...]:
    """GPT-2's byte-level alphabet: each byte as a printable character, itself where it is one (! to ~, ¡ to ¬,
    ® to ÿ), else the next code point from 256 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_ins = iter(range(256, 512))
    return tuple(chr(b) if b in printable else chr(next(stand_ins)) for b in range(256))


BYTE_TO_CHAR = _byte_to_char()
CHAR_TO_BYTE = {c: b for b, c in enumerate(BYTE_TO_CHAR)}
# Pieces that end generation in a byte-level BPE vocabulary beside its eos and eot ids, by their text, as llama.cpp's
# vocabulary loader (src/llama-vocab.cpp) finds them: turn and text ends, and the fill-in-the-middle pad, repository
# and file-separator tokens (SmolLM2: <|endoftext|>, <|im_end|>, <reponame>; Qwen 2.5's <|file_sep|> too:
# llama_vocab_is_eog, llama-cpp-python 0.3.36)
BPE_END_PIECES = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
                  "<|endoftext|>", "<|end_of_text|>", "<EOT>", "_<EOT>", "<end_of_utterance>", "<|fim_pad|>",
                  "<|repo_name|>", "<reponame>", "<|file_sep|>")


@dataclass(frozen=True)
class TokenizerFacts:
    """What a Tokenizer needs besides its pieces (for a sentencepiece model, cached next to it as JSON)."""

    bos_id: int | None
    eos_ids: tuple[int, ...]
    add_bos: bool
    chat_template: str | None
    special_pieces: tuple[str, ...]  # control tokens, matched in text only when parse_special


def _identity_key(path: Path) -> str:
    stat = path.stat()
    ident = f"{CACHE_FORMAT_VERSION}|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


def _build_from_header(meta: dict, path: Path) -> tuple[bytes, TokenizerFacts]:
    """The serialized sentencepiece ModelProto and facts, from the GGUF's metadata."""
    from sentencepiece import sentencepiece_model_pb2 as spm

    tokens, meta = _vocabulary(meta, path)
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    if unk_id is None:
        raise OpenLPUError(f"{path}: tokenizer has no unknown token; cannot build it")
    index = {piece: i for i, piece in enumerate(tokens)}
    ends = [index[p] for p in END_OF_TURN_PIECES.get(meta.get("general.architecture", ""), ()) if p in index]
    for i in ends:
        types[i] = CONTROL
    # llama.cpp matches the control tokens in text parsed for special tokens, <unk> too where the file marks it so
    special_pieces = tuple(t for t, k in zip(tokens, types) if k == CONTROL)
    types[unk_id] = UNKNOWN  # sentencepiece needs exactly one; llama.cpp files may mark it control

    proto = spm.ModelProto()
    for piece, score, kind_code in zip(tokens, scores, types):
        if kind_code == USER_DEFINED:  # llama.cpp matches these in the raw text; sentencepiece
            piece = piece.replace(" ", SPACE_ESCAPE)  # matches after escaping spaces
        proto.pieces.add(piece=piece, score=score, type=kind_code)
    trainer = proto.trainer_spec
    trainer.model_type = spm.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = BYTE in types
    trainer.unk_id = unk_id
    trainer.bos_id = meta.get("tokenizer.ggml.bos_token_id", -1)
    trainer.eos_id = meta.get("tokenizer.ggml.eos_token_id", -1)
    trainer.pad_id = meta.get("tokenizer.ggml.padding_token_id", -1)
    for field_name, token_id in (("unk_piece", trainer.unk_id), ("bos_piece", trainer.bos_id),
                                 ("eos_piece", trainer.eos_id), ("pad_piece", trainer.pad_id)):
        if token_id >= 0:
            setattr(trainer, field_name, tokens[token_id])
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"  # llama.cpp only escapes spaces; it applies no NFKC
    normalizer.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True

    eos = [trainer.eos_id] if trainer.eos_id >= 0 else []
    if "tokenizer.ggml.eot_token_id" in meta:
        eos.append(meta["tokenizer.ggml.eot_token_id"])
    eos += ends
    facts = TokenizerFacts(
        bos_id=trainer.bos_id if trainer.bos_id >= 0 else None,
        eos_ids=tuple(dict.fromkeys(eos)),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", trainer.bos_id >= 0)),
        chat_template=meta.get("tokenizer.chat_template"),
        special_pieces=special_pieces,
    )
    return proto.SerializeToString(), facts


def _vocabulary(meta: dict, path: Path) -> tuple[list[str], dict]:
    """The token list, checked against what indexes it: each per-token array and the model's vocab_size (the
    model emits ids up to it, and each needs a piece); and the metadata without a special id no token has, left out
    as llama.cpp's vocabulary loader leaves it ("bad special token": real files name a padding id one past their
    tokens)."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise OpenLPUError(f"{path}: the file has tokenizer metadata but no token list (tokenizer.ggml.tokens); "
                           "it is broken, re-convert it with a current llama.cpp")
    broken = "the file is broken, re-convert it with a current llama.cpp"
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        if key in meta and len(meta[key]) != len(tokens):
            raise OpenLPUError(f"{path}: GGUF metadata {key} holds {len(meta[key])} entries for {len(tokens)} tokens; "
                               f"{broken}")
    vocab_key = f"{meta.get('general.architecture', '')}.vocab_size"
    if meta.get(vocab_key, len(tokens)) != len(tokens):
        raise OpenLPUError(f"{path}: GGUF metadata {vocab_key} = {meta[vocab_key]} differs from the token list's "
                           f"{len(tokens)} entries (the model would emit ids with no piece); {broken}")
    return tokens, {k: v for k, v in meta.items() if k not in SPECIAL_ID_KEYS
                    or isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(tokens)}


class Tokenizer:
    """encode / decode / stream-decode with ids identical to llama.cpp's for the same GGUF: what both kinds of
    vocabulary share. A kind gives its facts, each id's bytes, the pieces matched as a whole in the text (always,
    or only when parsing special tokens) and the encoding of the plain text between them."""

    def __init__(self, facts: TokenizerFacts, token_bytes: list[bytes], special_ids: dict[str, int],
                 always_ids: dict[str, int]):
        self.facts = facts
        self._token_bytes = token_bytes
        self._special_ids = {**special_ids, **always_ids}  # parsing special tokens matches both
        self._always_ids = always_ids  # matched in any text (llama.cpp's user-defined tokens)
        self._longest_first: dict[bool, list[str]] = {}  # parse_special -> the pieces it matches, longest first

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, path: str | Path, cache: bool = True) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise OpenLPUError(f"model file not found: {path}; check the path")
        if cache and (cached := SentencePieceTokenizer.cached(path)) is not None:
            return cached
        from openlpu.models.gguf import read_header

        meta = read_header(path).metadata
        kind = meta.get("tokenizer.ggml.model")
        if kind is None:
            raise OpenLPUError(f"{path}: the file carries no tokenizer (no tokenizer.ggml.model in its metadata); "
                               "give a GGUF file with its tokenizer, as llama.cpp's converter writes it")
        if kind not in SUPPORTED_TOKENIZER_MODELS:
            raise OpenLPUError(f"{path}: tokenizer {kind!r} is not supported (supported: "
                               f"{', '.join(SUPPORTED_TOKENIZER_MODELS)}); {RUNNABLE}")
        if kind == "gpt2":
            return ByteBPETokenizer.from_metadata(meta, path)
        return SentencePieceTokenizer.built(meta, path, cache)

    # ---- vocabulary facts -------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self._token_bytes)

    @property
    def bos_id(self) -> int | None:
        return self.facts.bos_id

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Ids that end generation (Gemma 3: <eos> and <end_of_turn>)."""
        return self.facts.eos_ids

    @property
    def chat_template(self) -> str | None:
        return self.facts.chat_template

    def token_to_id(self, piece: str) -> int:
        raise NotImplementedError

    def id_to_piece(self, token_id: int) -> str:
        raise NotImplementedError

    def _encode_plain(self, text: str) -> list[int]:
        raise NotImplementedError

    # ---- encode / decode --------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = False) -> list[int]:
        """Token ids of text; add_bos None follows the GGUF (tokenizer.ggml.add_bos_token).

        parse_special: control tokens written in the text (e.g. "<start_of_turn>" from a chat
        template) become their ids, as llama.cpp does with parse_special=true.
        """
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate: Python's stand-in for a byte that is not UTF-8
            raise OpenLPUError(f"the text holds {text[e.start:e.end]!r} at character {e.start}, which is no Unicode "
                               f"character (a byte that is not UTF-8, as a command line in another encoding "
                               f"gives); give UTF-8 text") from None
        if add_bos is None:
            add_bos = self.facts.add_bos
        ids = [self.bos_id] if add_bos and self.bos_id is not None else []
        for fragment, is_special in self._fragments(text, parse_special):
            ids += [self._special_ids[fragment]] if is_special else self._encode_plain(fragment)
        return ids

    def _fragments(self, text: str, parse_special: bool):
        """(text, is_special) pieces of `text`, as llama.cpp's tokenizer_st_partition cuts them: each special piece,
        the longest first, matched everywhere in what the longer ones left, before a shorter one is tried."""
        matched = self._special_ids if parse_special else self._always_ids
        if not matched:
            return [(text, False)]
        if parse_special not in self._longest_first:
            self._longest_first[parse_special] = sorted(matched, key=len, reverse=True)
        # only the pieces whose first characters the text holds: Gemma's 6,250 control pieces each searched for
        # in a chat prompt took 10 ms
        starts = {text[i:i + n] for n in range(1, PREFIX_CHARS + 1) for i in range(len(text))}
        fragments = [(text, False)]
        for piece in self._longest_first[parse_special]:
            if piece[:PREFIX_CHARS] not in starts or not any(not special and piece in part
                                                             for part, special in fragments):
                continue
            cut = []
            for part, special in fragments:
                if special or piece not in part:
                    cut.append((part, special))
                    continue
                for i, between in enumerate(part.split(piece)):
                    cut += [(piece, True)] * (i > 0) + [(between, False)] * (between != "")
            fragments = cut
        return fragments

    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < len(self._token_bytes):
            raise OpenLPUError(f"token id {token_id} is out of range (vocabulary {self.vocab_size})")
        return self._token_bytes[token_id]

    def decode(self, ids) -> str:
        """Text of ids (control tokens such as <bos> give no text), invalid UTF-8 replaced."""
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)


class SentencePieceTokenizer(Tokenizer):
    """A "llama" vocabulary: sentencepiece's BPE over the ModelProto built from the file, which matches its
    user-defined pieces itself."""

    def __init__(self, model_proto: bytes, facts: TokenizerFacts):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        super().__init__(facts, [self._piece_bytes(i) for i in range(self._sp.get_piece_size())],
                         {p: self._sp.piece_to_id(p) for p in facts.special_pieces}, {})

    @classmethod
    def cached(cls, path: Path) -> SentencePieceTokenizer | None:
        """The tokenizer built from this file before, if the cache holds it whole."""
        folder = _cache_folder(path)
        model_file, facts_file = folder / "tokenizer.model", folder / "facts.json"
        if not (model_file.exists() and facts_file.exists()):
            return None
        try:
            data = json.loads(facts_file.read_text())
            data["eos_ids"], data["special_pieces"] = tuple(data["eos_ids"]), tuple(data["special_pieces"])
            return cls(model_file.read_bytes(), TokenizerFacts(**data))
        except (OSError, ValueError, TypeError, KeyError, RuntimeError):  # a damaged entry (a crash, a full
            return None  # disk) is built again, as a missing one is; sentencepiece says RuntimeError

    @classmethod
    def built(cls, meta: dict, path: Path, cache: bool) -> SentencePieceTokenizer:
        proto, facts = _build_from_header(meta, path)
        if cache:
            folder = _cache_folder(path)
            try:  # facts last and each file renamed into place: a present facts.json means done
                folder.mkdir(parents=True, exist_ok=True)
                for target, content in ((folder / "tokenizer.model", proto),
                                        (folder / "facts.json", json.dumps(facts.__dict__).encode())):
                    partial = target.with_suffix(f".partial{os.getpid()}")
                    partial.write_bytes(content)
                    partial.replace(target)
            except OSError:
                pass  # an unwritable cache only costs the next start a rebuild
        return cls(proto, facts)

    def _piece_bytes(self, token_id: int) -> bytes:
        """llama.cpp token_to_piece (special=False): what this token contributes to the text."""
        sp = self._sp
        if sp.is_byte(token_id):
            return bytes([int(sp.id_to_piece(token_id)[1:-1], 16)])  # "<0xE2>"
        if sp.is_control(token_id) or sp.is_unknown(token_id) or sp.is_unused(token_id):
            return b""
        return sp.id_to_piece(token_id).replace(SPACE_ESCAPE, " ").encode("utf-8")

    def token_to_id(self, piece: str) -> int:
        """Id of a piece as the GGUF spells it (or with spaces escaped as "▁")."""
        token_id = self._sp.piece_to_id(piece.replace(" ", SPACE_ESCAPE))
        if token_id == self._sp.unk_id() and piece != self._sp.id_to_piece(token_id):
            raise OpenLPUError(f"token {piece!r} is not in the vocabulary")
        return token_id

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def _encode_plain(self, text: str) -> list[int]:
        return self._sp.encode(text)


class ByteBPETokenizer(Tokenizer):
    """A "gpt2" vocabulary: the text split by its pre-tokenizer (BPE_PRE_TOKENIZERS), each piece's bytes as GPT-2's
    characters (BYTE_TO_CHAR), merged by the lowest-ranked adjacent pair first (llama.cpp's llm_tokenizer_bpe)."""

    def __init__(self, tokens: list[str], types: list[int], merges: list[str], pre: str, facts: TokenizerFacts):
        import regex

        self._pieces, self._ids = tokens, {t: i for i, t in enumerate(tokens)}
        self._ranks = {tuple(m.split(" ", 1)): rank for rank, m in enumerate(merges)}
        expressions, self._whole_words = BPE_PRE_TOKENIZERS[pre]
        self._splits = [regex.compile(e) for e in expressions]
        self._words: dict[str, tuple[int, ...]] = {}
        super().__init__(facts, list(map(_byte_level_bytes, tokens, types)),
                         {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k in (CONTROL, UNKNOWN)},
                         {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k == USER_DEFINED})

    @classmethod
    def from_metadata(cls, meta: dict, path: Path) -> ByteBPETokenizer:
        tokens, meta = _vocabulary(meta, path)
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in BPE_PRE_TOKENIZERS:
            raise OpenLPUError(f"{path}: byte-level BPE pre-tokenizer {pre!r} is not one OpenLPU knows (it knows "
                               f"{', '.join(BPE_PRE_TOKENIZERS)}); {RUNNABLE}")
        merges = meta.get("tokenizer.ggml.merges")
        if not isinstance(merges, list) or not all(isinstance(m, str) and m.count(" ") == 1 for m in merges):
            raise OpenLPUError(f"{path}: the byte-level BPE vocabulary has no list of merges (tokenizer.ggml.merges, "
                               f"each two pieces with a space between); re-convert it with a current llama.cpp")
        index = {t: i for i, t in enumerate(tokens)}
        types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
        bos = meta.get("tokenizer.ggml.bos_token_id")
        ends = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
        ends += [index[p] for p in BPE_END_PIECES if p in index]
        facts = TokenizerFacts(bos_id=bos, eos_ids=tuple(sorted(set(ends))),
                               add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", bos is not None)),
                               chat_template=meta.get("tokenizer.chat_template"),
                               special_pieces=tuple(t for t, k in zip(tokens, types) if k in (CONTROL, UNKNOWN)))
        return cls(tokens, types, merges, pre, facts)

    def token_to_id(self, piece: str) -> int:
        """Id of a piece as the GGUF spells it (GPT-2's characters: "Ġthe" for " the")."""
        if piece not in self._ids:
            raise OpenLPUError(f"token {piece!r} is not in the vocabulary")
        return self._ids[piece]

    def id_to_piece(self, token_id: int) -> str:
        return self._pieces[token_id]

    def _encode_plain(self, text: str) -> list[int]:
        pieces = [text]
        for split in self._splits:  # each expression splits what the last left: its matches and the gaps
            pieces = [part for piece in pieces for part in _split_keeping_gaps(split, piece)]
        return [i for piece in pieces for i in self._word(piece)]

    def _word(self, piece: str) -> tuple[int, ...]:
        """The ids of one pre-tokenized piece, its bytes merged pair by pair, the lowest rank (then the leftmost)
        first; a symbol no token spells is its bytes' tokens, a byte the vocabulary has none for left out, as
        llama.cpp leaves it (SmolLM2 has none for 21 bytes, control characters among them)."""
        if (ids := self._words.get(piece)) is not None:
            return ids
        word = "".join(BYTE_TO_CHAR[b] for b in piece.encode("utf-8"))
        symbols = [word] if self._whole_words and word in self._ids else self._merged(word)
        ids = tuple(i for symbol in symbols
                    for i in ((self._ids[symbol],) if symbol in self._ids
                              else (self._ids[c] for c in symbol if c in self._ids)))
        if len(self._words) < WORD_CACHE_SIZE and len(piece) <= CACHED_PIECE_CHARS:
            self._words[piece] = ids
        return ids

    def _merged(self, word: str) -> list[str]:
        """The word's characters merged pair by pair, the lowest rank (then the leftmost) first: a heap of the
        adjacent pairs and a list linking the symbols left, so a long word costs n log n, not n squared (a
        pair whose symbols have changed since it was pushed is skipped when it comes up)."""
        symbols, after = list(word), [*range(1, len(word)), -1]
        before = list(range(-1, len(word) - 1))
        heap = [(rank, i, symbols[i], symbols[i + 1]) for i in range(len(word) - 1)
                if (rank := self._ranks.get((symbols[i], symbols[i + 1]))) is not None]
        heapq.heapify(heap)
        while heap:
            _, i, left, right = heapq.heappop(heap)
            j = after[i]
            if symbols[i] != left or j < 0 or symbols[j] != right:
                continue  # stale: one of its symbols was merged into another since
            symbols[i], symbols[j] = left + right, ""
            after[i] = after[j]
            if after[j] >= 0:
                before[after[j]] = i
            for a, b in ((before[i], i), (i, after[i])):
                if a >= 0 and b >= 0 and (rank := self._ranks.get((symbols[a], symbols[b]))) is not None:
                    heapq.heappush(heap, (rank, a, symbols[a], symbols[b]))
        return [symbol for symbol in symbols if symbol]


def _byte_level_bytes(piece: str, kind: int) -> bytes:
    """llama.cpp token_to_piece (special=False) of a byte-level BPE token: a control or unknown token gives
    nothing, a user-defined one its text, the others the bytes their GPT-2 characters stand for (a character
    outside that alphabet, its own UTF-8)."""
    if kind in (CONTROL, UNKNOWN, UNUSED):
        return b""
    if kind == USER_DEFINED:
        return piece.encode("utf-8")
    return b"".join(bytes([CHAR_TO_BYTE[c]]) if c in CHAR_TO_BYTE else c.encode("utf-8") for c in piece)


PREFIX_CHARS = 3  # of a special piece, looked up among the text's before the piece is searched for
WORD_CACHE_SIZE, CACHED_PIECE_CHARS = 1 << 16, 64  # the pre-tokenized pieces whose ids a byte-level BPE tokenizer
# keeps: words, not a megabyte run of letters


def _split_keeping_gaps(expression, text: str) -> list[str]:
    """text cut at the matches of `expression`: the matches and the text between them, in order, none empty."""
    parts, start = [], 0
    for match in expression.finditer(text):
        parts += [p for p in (text[start:match.start()], match.group()) if p]
        start = match.end()
    return parts + ([text[start:]] if start < len(text) else [])


def _cache_folder(path: Path) -> Path:
    from openlpu.models.embedded import cache_dir

    return cache_dir() / "tokenizers" / _identity_key(path)


class StreamDecoder:
    """Turns ids arriving one at a time into text deltas; a character split over several byte
    tokens is emitted once complete. The deltas concatenate to exactly decode(all ids)."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Whatever an unfinished byte sequence at the end decodes to (U+FFFD)."""
        return self._utf8.decode(b"", final=True)
