"""The Program: placement plus the static schedule, serialisable byte-for-byte deterministically.

File format (version FORMAT_VERSION): MAGIC, a 4-byte little-endian version, the sha256 of the
payload, then the payload: gzip (mtime 0) of canonical JSON (sorted keys, no spaces). Lists of
records are stored as a column header and rows, which keeps a 405B program small; the transfers' link
loads as a table of the distinct sets, which their phases name by index (every layer's collective on a
group loads the same links alike: a 70B prefill of 32,768 tokens has 68,375 phases and 202 distinct sets).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import gzip
import hashlib
import json
import os
import stat
import struct
import typing
import zlib
from dataclasses import dataclass
from pathlib import Path

from openlpu.errors import OpenLPUError, check_count
from openlpu.graph.lower import as_precision
from openlpu.hardware.lpu import SystemSpec, system_from
from openlpu.models.spec import ModelSpec
from openlpu.paths import write_whole

MAGIC = b"OPENLPU-PROGRAM\n"
HEADER_BYTES = len(MAGIC) + 4 + 32  # the magic, the version, the payload's sha256
GZIP_OS_BYTE = 9  # RFC 1952: the header's OS field, set the same whatever Python wrote it
# a ModelSpec's fields that make the model (not where it was read from): the same model from a preset or a file
SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(ModelSpec) if f.compare)
# 2: stages hold pieces (a layer may be cut between stages); 3: embedding and head pieces hold
# vocabulary row ranges (either may be split between stages); 4: attention pieces may hold ranges of
# their layer's KV slots (an attention split between stages), transfers "rank_p2p"; 5: each layer's KV
# slots per user; 6: a decode step carries a micro-batch of users (its tokens); 7: a transfer records
# its links per phase (a collective's steps, each with its own cycles); 8: the workload's draft tokens (a
# decode step verifies them); 9: a placement records whether its MoE MLPs are cut and split by whole
# experts (expert parallelism), their pieces then holding expert ranges; 10: cut by expert rows instead,
# pieces and shards (axis EXPERT_ROWS) hold ranges of the experts' d_ff rows end to end; 11: a phase names
# its link loads by their index in the Program's table of distinct ones; 12: the workload's decode context; 13:
# the model's spec, whose tensors and graph the Program's are checked against, in place of its name and tensors
FORMAT_VERSION = 13


def gc_paused(build):
    """`build` run with the cyclic garbage collector paused. A Program is hundreds of thousands of records
    and tuples without cycles: with the collector on, every 700 allocations set off a collection, and the
    older generations' collections walk those built before again and again; reference counting frees them
    all the same (a 70B Program for a 32,768-token prompt loads in 1.0 s instead of 2.0, and compiles a fifth
    faster). What a build leaves is walked once, at the first collection after it."""
    @functools.wraps(build)
    def paused(*args, **kwargs):
        if not gc.isenabled():  # paused already (a build within a build)
            return build(*args, **kwargs)
        gc.disable()
        try:
            return build(*args, **kwargs)
        finally:
            gc.enable()
    return paused


PREFILL_CHUNKS = (256, 128, 64)  # the prefill chunks the compiler chooses from where none is given, largest first
# a prefill schedules its ops once per wave: 2,048 waves of a 70B model take minutes to compile, more take longer
MAX_PREFILL_WAVES = 2048  # the most a compile schedules (Workload.check_prefill_waves)


@dataclass(frozen=True)
class Workload:
    """What the system must hold and serve: precisions, context per user, users in flight."""
    weights: str = "int8"
    activations: str = "int8"
    kv: str = "int8"
    context_length: int = 4096  # tokens of KV cache per user
    users: int = 1  # users in flight in the pipeline, each with its own KV cache
    prompt_len: int = 512  # tokens of the prefill pass that sets the time to first token
    # prompt tokens per pipeline wave: bounds activation buffers, overlaps stages (None: the compiler's choice of
    # PREFILL_CHUNKS; a Program's workload holds the one chosen)
    prefill_chunk: int | None = None
    # speculative decoding: tokens a draft model proposes per step, which each decode step verifies
    # (its users each bring draft_tokens + 1 new tokens; sim.speculative turns steps into tokens)
    draft_tokens: int = 0
    # tokens each decode step attends (None: the whole context): a static schedule attends a fixed length, so a
    # deployment serving requests shorter than the window it holds keeps a Program per length they reach
    decode_context: int | None = None

    @staticmethod
    def default_prompt_len(context: int) -> int:
        """The default prompt_len, or the whole context where shorter."""
        return min(Workload.prompt_len, context)

    @property
    def chunk_tokens(self) -> int:
        """Prompt tokens per wave: the chunk given, or the compiler's first choice (what placing and scheduling
        size with outside compile_program, which tries the others)."""
        return PREFILL_CHUNKS[0] if self.prefill_chunk is None else self.prefill_chunk

    def check_prefill_waves(self) -> None:
        """Refuse to compile more prefill waves than MAX_PREFILL_WAVES (a Program file holding more loads: its
        waves are already scheduled)."""
        if (waves := -(-self.prompt_len // self.chunk_tokens)) > MAX_PREFILL_WAVES:
            raise OpenLPUError(f"a {self.prompt_len:,}-token prompt in chunks of {self.chunk_tokens:,} makes {waves:,} "
                               f"prefill waves, more than the {MAX_PREFILL_WAVES:,} a compile schedules; use "
                               f"--prefill-chunk {-(-self.prompt_len // MAX_PREFILL_WAVES):,} or more")

    def check_window(self, spec: ModelSpec) -> None:
        """Refuse a context longer than the model's window (a compile's, and a Program file's)."""
        if self.context_length > spec.context_length:
            raise OpenLPUError(f"context {self.context_length} is longer than {spec.name}'s context window "
                               f"({spec.context_length} tokens); use at most {spec.context_length}")

    @property
    def attended_context(self) -> int:
        """Tokens each decode step attends."""
        return self.context_length if self.decode_context is None else self.decode_context

    def __post_init__(self):
        for p in (self.weights, self.activations, self.kv):
            as_precision(p)
        sizes = ["context_length", "users", "prompt_len"]
        sizes += [name for name in ("decode_context", "prefill_chunk") if getattr(self, name) is not None]
        for name in sizes:
            check_count(getattr(self, name), name.replace("_", " "))
        check_count(self.draft_tokens, "draft tokens", least=0)
        if self.draft_tokens >= self.context_length:
            raise OpenLPUError(f"draft tokens {self.draft_tokens}: a verifying step's drafts and the token before "
                               f"them must fit the context {self.context_length}; propose fewer")
        if self.prompt_len > self.context_length:
            raise OpenLPUError(f"prompt length {self.prompt_len} is longer than the context "
                               f"{self.context_length}; raise --context or shorten the prompt")
        if self.attended_context > self.context_length:
            raise OpenLPUError(f"decode context {self.decode_context} is longer than the context {self.context_length}: "
                               f"a decode step attends at most the tokens each user holds; lower --decode-context or "
                               f"raise --context")


@dataclass(frozen=True)
class Shard:
    tensor: str
    chip: int
    axis: int  # or partition.EXPERT_ROWS: an expert tensor's experts' d_ff rows, end to end
    start: int  # [start, stop) along axis, in elements
    stop: int
    nbytes: int
    replicated: bool  # an intentional copy (norms, KV heads shared by several chips, a tied embedding)


@dataclass(frozen=True)
class Stage:
    index: int
    chips: tuple[int, ...]  # the TP group, in rank order
    # (item, part, start, stop) in pipeline order: item -1 = embedding, a layer index, n_layers = head
    # (final norm + lm_head); part "embed" | "attn" | "ffn" | "head"; [start, stop) = the d_ff rows of
    # an MLP piece (its expert rows, if Placement.experts and the layer has them) or the vocabulary rows of
    # an embedding or head piece, the KV slots of an attention piece (each may be split between
    # consecutive stages; a whole attention is (0, 0))
    pieces: tuple[tuple[int, str, int, int], ...]
    kv_bytes_per_chip: int
    activation_bytes_per_chip: int  # reserved for activation buffers

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """The layers whose attention (and so whose KV cache) this stage holds."""
        return tuple(item for item, part, _, _ in self.pieces if part == "attn")


@dataclass(frozen=True)
class Placement:
    tp: int
    stages: tuple[Stage, ...]
    shards: tuple[Shard, ...]
    experts: bool = False  # MoE MLPs cut between stages and split over TP groups by expert rows, not d_ff rows

    @property
    def chips(self) -> tuple[int, ...]:
        return tuple(c for s in self.stages for c in s.chips)


@dataclass(frozen=True, slots=True)  # many per Program: no __dict__ each
class ScheduledOp:
    """One op on one TP group: every chip of the stage runs it on its shard in the same cycles."""
    name: str
    kind: str
    unit: str
    stage: int
    start_cycle: int
    end_cycle: int
    flops_per_chip: float
    sram_bytes_per_chip: float  # SRAM traffic: weights, KV and activations read and written
    output_bytes_per_chip: float  # its activation result, held in SRAM until its last consumer
    inputs: tuple[str, ...]  # ops or transfers whose results it needs


# Per transfer kind, which of its chips send its input, which it delivers its result to, and what each of
# those holds of the payload afterwards. Transfer.chips holds the source first for a send or broadcast,
# the group for a collective, and both groups in rank order for a rank-to-rank send.
TRANSFER_ENDS = {  # kind: (senders, receivers, each receiver's new bytes)
    "p2p": ("source", "rest", "whole"),
    "broadcast": ("source", "rest", "whole"),
    "all_reduce": ("group", "group", "none"),  # summed in place, in its input's buffer
    # the other ranks' shares, laid beside the chip's own (which a stripe or rank-to-rank send left in its
    # slot of the result: every address is the compiler's to choose), so the gathered vector is one copy
    "all_gather": ("group", "group", "others' shares"),
    "rank_p2p": ("first half", "second half", "share"),
    "stripe": ("first half", "second half", "share"),
}


def transfer_ends(kind: str, chips: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(senders, receivers) of a transfer of `kind` over `chips` (TRANSFER_ENDS)."""
    half = len(chips) // 2
    roles = {"source": chips[:1], "rest": chips[1:], "group": chips, "first half": chips[:half],
             "second half": chips[half:]}
    senders, receivers, _ = TRANSFER_ENDS[kind]
    return roles[senders], roles[receivers]


@dataclass(frozen=True, slots=True)  # many per Program: no __dict__ each
class Transfer:
    """Vectors on chip-to-chip links: a point-to-point send, a broadcast, a TP all-reduce, a value
    split by heads over a group moving rank r to rank r of the next group (rank_p2p), a value every chip
    of a group holds sent as one share per rank the same way (stripe), and the gathering of those
    shares over the receiving group (all_gather). A send is one
    phase on the links of its route; a collective is one phase per step of its algorithm, each
    starting when the step before it has arrived and its own links are free."""
    name: str
    kind: str  # "p2p" | "broadcast" | "all_reduce" | "rank_p2p" | "stripe" | "all_gather"
    stage: int  # the stage whose ops consume it
    chips: tuple[int, ...]  # source first for p2p/broadcast; the group for collectives; both groups for rank sends
    path: tuple[int, ...]  # chips visited, for a p2p send
    payload_bytes: float
    # per phase: (start cycle, arrival cycle, ((from chip, to chip, bytes on that directed link), ...))
    phases: tuple[tuple[int, int, tuple[tuple[int, int, float], ...]], ...]
    start_cycle: int
    arrival_cycle: int
    inputs: tuple[str, ...]

    @property
    def senders(self) -> tuple[int, ...]:
        return transfer_ends(self.kind, self.chips)[0]

    @property
    def receivers(self) -> tuple[int, ...]:
        return transfer_ends(self.kind, self.chips)[1]

    def link_loads(self):
        """(from chip, to chip, bytes) for every directed link of every phase."""
        return ((a, b, nbytes) for _, _, links in self.phases for a, b, nbytes in links)


@dataclass(frozen=True)
class PhaseSchedule:
    phase: str  # "decode" (one token step of a micro-batch of users) or "prefill" (one prompt)
    seq_len: int  # decode: tokens each user attends; prefill: prompt tokens
    tokens: int  # decode: users in the micro-batch, each with workload.draft_tokens + 1 tokens; prefill: prompt tokens
    ops: tuple[ScheduledOp, ...]
    transfers: tuple[Transfer, ...]
    makespan_cycles: int


@dataclass(frozen=True)
class Program:
    version: int
    spec: ModelSpec  # the model compiled: the verifier checks the schedule against its graph
    system: SystemSpec
    workload: Workload
    kv_slots: tuple[int, ...]  # per layer: KV positions each user keeps (the context, or a shorter sliding window)
    placement: Placement
    decode: PhaseSchedule
    prefill: PhaseSchedule

    @property
    def model(self) -> str:
        return self.spec.name

    @functools.cached_property
    def tensors(self) -> dict[str, tuple[int, ...]]:
        """Every weight tensor of the model with its shape."""
        return self.spec.tensor_shapes()

    @property
    def chips(self) -> int:
        return len(self.placement.chips)

    def sha256(self) -> str:
        return hashlib.sha256(encode(self)).hexdigest()

    def save(self, path: str | Path) -> str:
        """Write the Program whole or not at all (paths.write_whole). Returns the file's sha256 (as sha256(),
        without encoding a large Program twice)."""
        data = encode(self)
        write_whole(path, data, "Program")
        return hashlib.sha256(data).hexdigest()


# ---- encoding ---------------------------------------------------------------------------------
def _table(records) -> dict:
    """Records of plain fields (numbers, strings, tuples of them) as columns and rows; JSON writes a tuple
    as it writes a list, so the fields go as they are."""
    cols = [f.name for f in dataclasses.fields(records[0])] if records else []
    return {"columns": cols, "rows": [[getattr(r, c) for c in cols] for r in records]}


def _plain(v):
    if v is None or isinstance(v, (int, float, str)):  # most fields: nothing to convert
        return v
    if dataclasses.is_dataclass(v):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


PHASES = [f.name for f in dataclasses.fields(Transfer)].index("phases")  # the transfers' column of phases


def _phase_dict(ph: PhaseSchedule, link_loads: dict) -> dict:
    """The phase as tables; each transfer phase's link loads become their index in `link_loads` (distinct
    loads -> index, in the order first met), which grows as it meets new ones."""
    transfers = _table(ph.transfers)
    for row in transfers["rows"]:
        row[PHASES] = [(start, arrival, link_loads.setdefault(links, len(link_loads)))
                       for start, arrival, links in row[PHASES]]
    return {"phase": ph.phase, "seq_len": ph.seq_len, "tokens": ph.tokens, "makespan_cycles": ph.makespan_cycles,
            "ops": _table(ph.ops), "transfers": transfers}


def encode(program: Program) -> bytes:
    link_loads: dict = {}
    body = {
        "spec": {k: v for k, v in program.spec.to_dict().items() if k in SPEC_FIELDS},
        "system": _plain(dataclasses.replace(program.system, sources={})),
        "workload": _plain(program.workload),
        "kv_slots": list(program.kv_slots),
        "placement": {"tp": program.placement.tp, "stages": _table(program.placement.stages),
                      "shards": _table(program.placement.shards), "experts": program.placement.experts},
        "decode": _phase_dict(program.decode, link_loads),
        "prefill": _phase_dict(program.prefill, link_loads),
        "link_loads": list(link_loads),
    }
    # level 6, not gzip's 9: about 4x faster on a 10,000-chip Program, for a file about 4% larger
    payload = gzip.compress(json.dumps(body, sort_keys=True, separators=(",", ":")).encode(), compresslevel=6,
                            mtime=0)
    # the header's operating-system byte: Python 3.11 and 3.12 write 3 (Unix), 3.10 and 3.13 255 (unknown)
    payload = payload[:GZIP_OS_BYTE] + b"\xff" + payload[GZIP_OS_BYTE + 1:]
    return MAGIC + struct.pack("<I", program.version) + hashlib.sha256(payload).digest() + payload


def _tuples(v):
    return tuple([_tuples(x) if type(x) is list else x for x in v]) if type(v) is list else v


def _all_of(values: list, hint) -> bool:
    """Whether every value read back (lists made tuples) has the annotated type: the JSON a file holds could
    give any, and what reads a Program counts on its types. A column at a time, the elements of tuples and
    dicts gathered into columns of their own (a 70B Program's prefill has 167,835 ops)."""
    args = typing.get_args(hint)
    if hint is float:  # a whole number reads back as an int; bytes and FLOPs far beyond any op's, sums stay finite
        return set(map(type, values)) <= {int, float} and all(-1e18 <= v <= 1e18 for v in values)
    if hint is int:  # a count, a cycle, an index: within 64 bits, as any compiler writes them (floats hold them)
        return set(map(type, values)) <= {int} and (not values or -2**63 <= min(values) and max(values) < 2**63)
    if hint in (str, bool, tuple, dict):  # a bare tuple or dict: of what is checked apart
        return set(map(type, values)) <= {hint}
    if typing.get_origin(hint) is dict:
        return set(map(type, values)) <= {dict} and _all_of([k for v in values for k in v], args[0]) \
            and _all_of([x for v in values for x in v.values()], args[1])
    if not set(map(type, values)) <= {tuple}:
        return False
    if args[-1] is Ellipsis:  # tuple[X, ...]
        return _all_of([x for v in values for x in v], args[0])
    return set(map(len, values)) <= {len(args)} and all(_all_of([v[i] for v in values], a) for i, a in enumerate(args))


def _type_name(hint) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint)


def _typed(name: str, value, hint):
    if not _all_of([value], hint):
        raise TypeError(f"its {name!r} is not {_type_name(hint)}")
    return value


def _rows(cls, table: dict, shallow: dict | None = None) -> tuple:
    """The records of a table, each field of its annotated type (`shallow`: field -> the type to check
    instead, where the rest is checked apart)."""
    fields, hints = dataclasses.fields(cls), {**typing.get_type_hints(cls), **(shallow or {})}
    expected = [f.name for f in fields]
    if table["rows"] and table["columns"] != expected:
        raise ValueError(f"its {cls.__name__} columns are not {', '.join(expected)}")
    # JSON gives lists back: the fields typed as tuples get tuples
    nested = [i for i, f in enumerate(fields) if tuple in (hints[f.name], typing.get_origin(hints[f.name]))]
    rows = table["rows"]
    if type(rows) is not list:
        raise ValueError(f"its {cls.__name__} rows are not a list")
    for row in rows:
        if type(row) is not list or len(row) != len(expected):
            raise ValueError(f"a {cls.__name__} row is not a list of its {len(expected)} fields")
        for i in nested:
            row[i] = _tuples(row[i])
    for i, name in enumerate(expected):
        if not _all_of([row[i] for row in rows], hints[name]):
            raise TypeError(f"a {cls.__name__}'s {name} is not {_type_name(hints[name])}")
    return tuple(cls(*row) for row in rows)


def _phase(d: dict, link_loads: list, name: str) -> PhaseSchedule:
    """The phase `name` ("decode" or "prefill") a file holds, its transfers' phases drawn from `link_loads`."""
    if d["phase"] != name:
        raise ValueError(f"its {name} phase is named {d['phase']!r}")
    if not all(type(d[field]) is int and d[field] >= 1 for field in ("seq_len", "tokens")):
        raise ValueError(f"its {name} phase's seq_len and tokens are not positive whole numbers "
                         f"({d['seq_len']!r}, {d['tokens']!r})")
    rows = d["transfers"]["rows"]
    phases = [_tuples(row[PHASES]) for row in rows]  # (start, arrival, index in link_loads) each
    if not _all_of(phases, tuple[tuple[int, int, int], ...]):
        raise TypeError("a transfer's phases are not (start, arrival, link load) each")
    if any(not 0 <= index < len(link_loads) for each in phases for _, _, index in each):
        raise IndexError(f"a transfer's phase names a link load its table of {len(link_loads)} lacks")
    for row, each in zip(rows, phases):  # each phase's link loads from the table, one tuple shared by all naming it
        row[PHASES] = [(start, arrival, link_loads[index]) for start, arrival, index in each]
    return PhaseSchedule(_typed("phase", d["phase"], str), _typed("seq_len", d["seq_len"], int),
                         _typed("tokens", d["tokens"], int),
                         _rows(ScheduledOp, d["ops"]), _rows(Transfer, d["transfers"], {"phases": tuple}),
                         _typed("makespan_cycles", d["makespan_cycles"], int))


def _workload(fields: dict, spec: ModelSpec) -> Workload:
    """The workload a file holds, refused where compile_program refuses it for the model (but for the wave cap,
    a compile's: a file holding more waves loads as written; verify checks the waves it holds)."""
    if not isinstance(fields, dict):
        raise TypeError("its workload is not a record of named fields")
    if unknown := sorted(set(fields) - {f.name for f in dataclasses.fields(Workload)}):
        raise ValueError(f"its workload has fields a Workload lacks: {', '.join(map(str, unknown))}")
    try:
        workload = Workload(**fields)
        workload.check_window(spec)
    except OpenLPUError as e:  # a value the workload refuses, said as a fault of the file
        raise ValueError(f"its workload: {e}") from None
    if workload.prefill_chunk is None:  # the compiler writes the chunk it chose
        raise ValueError("its workload names no prefill chunk")
    return workload


def _spec(fields: dict) -> ModelSpec:
    try:
        return ModelSpec.from_dict(fields, "its model")
    except OpenLPUError as e:  # a value the spec refuses, said as a fault of the file
        raise ValueError(str(e)) from None


@gc_paused
def decode_program(data: bytes, origin: str = "program") -> Program:
    if not data.startswith(MAGIC):
        raise OpenLPUError(f"{origin} is not an OpenLPU program (write one with `openlpu compile`)")
    if len(data) < HEADER_BYTES:
        raise OpenLPUError(f"{origin} is truncated ({len(data)} bytes, shorter than a Program's header); recompile it "
                           f"with `openlpu compile`")
    (version,) = struct.unpack("<I", data[len(MAGIC):len(MAGIC) + 4])
    if version != FORMAT_VERSION:
        newer = "a newer OpenLPU wrote it: upgrade OpenLPU to read it, or " if version > FORMAT_VERSION else ""
        raise OpenLPUError(f"{origin} is program format version {version}; this OpenLPU reads version "
                           f"{FORMAT_VERSION}: {newer}recompile it with `openlpu compile`")
    digest, payload = data[len(MAGIC) + 4:HEADER_BYTES], data[HEADER_BYTES:]
    if hashlib.sha256(payload).digest() != digest:
        raise OpenLPUError(f"{origin} is corrupt (checksum mismatch); recompile it with `openlpu compile`")
    try:
        b = json.loads(gzip.decompress(payload))
        link_loads = [_typed("link_loads", _tuples(links), tuple[tuple[int, int, float], ...])
                      for links in b["link_loads"]]
        placement = Placement(_typed("tp", b["placement"]["tp"], int), _rows(Stage, b["placement"]["stages"]),
                              _rows(Shard, b["placement"]["shards"]),
                              _typed("experts", b["placement"]["experts"], bool))
        system = system_from({k: v for k, v in b["system"].items() if k != "sources"}, f"{origin}'s system",
                             figures=False)
        spec = _spec(b["spec"])
        return Program(version=version, spec=spec, system=system, workload=_workload(b["workload"], spec),
                       kv_slots=_typed("kv_slots", _tuples(b["kv_slots"]), tuple[int, ...]), placement=placement,
                       decode=_phase(b["decode"], link_loads, "decode"),
                       prefill=_phase(b["prefill"], link_loads, "prefill"))
    except (OSError, EOFError, zlib.error, ValueError, KeyError, IndexError, TypeError, AttributeError,
            RecursionError, OverflowError) as e:  # the last two: nesting or numbers no compiler writes
        reason = f"it has no {e.args[0]!r}" if isinstance(e, KeyError) else str(e) or type(e).__name__
        raise OpenLPUError(f"{origin} is corrupt ({reason}); recompile it with `openlpu compile`") from None


def load_program(path: str | Path) -> Program:
    if not str(path):
        raise OpenLPUError("no Program file given; name one that `openlpu compile MODEL -o FILE` wrote")
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a pipe would block the read until something writes to it
            raise OpenLPUError(f"program {str(path)!r} is not a file; name one that `openlpu compile MODEL -o FILE` "
                               f"wrote")
        with open(path, "rb") as f:  # the magic first: a large file of another kind is refused unread
            data = f.read(len(MAGIC))
            if data == MAGIC:
                data += f.read()
    except OSError as e:
        raise OpenLPUError(f"cannot read program {str(path)!r}: {e.strerror}") from None
    return decode_program(data, origin=str(path))
