"""One row per op: the same fields for every kind, so reports are groupings of rows (GenZ style)."""

from __future__ import annotations

from dataclasses import dataclass

OP_KINDS = ("embed", "norm", "matmul", "rope", "attention", "activation", "moe_router", "residual",
            "softcap", "sink", "bias", "lm_head", "sample", "merge")  # collectives: the schedule's transfers
# the LPU's functional-unit classes; no op lowered runs on the switch unit (the permutations a layer needs,
# RoPE's rotation and the K/V layouts, are folded into its vector ops and the matrix unit's installs)
UNITS = ("matrix", "vector", "switch", "memory")


@dataclass(frozen=True, slots=True)  # many per graph: no __dict__ each
class Op:
    name: str  # unique within a graph, e.g. "blk.3.attn_q"
    kind: str  # one of OP_KINDS
    layer: int  # -1 outside the layer stack
    unit: str  # one of UNITS: which functional unit class executes it
    shape: tuple[int, ...]  # (M, N, K) for matmuls; the output shape otherwise
    flops: float
    weight_bytes: float  # weights read (SRAM on an LPU, HBM on a GPU)
    kv_read_bytes: float
    kv_write_bytes: float
    act_read_bytes: float  # activations read
    act_write_bytes: float  # activations written
    weight: str | None = None  # GGUF tensor name this op reads, if any
    inputs: tuple[str, ...] = ()  # names of the ops whose outputs it consumes

    @property
    def bytes_total(self) -> float:
        return (self.weight_bytes + self.kv_read_bytes + self.kv_write_bytes
                + self.act_read_bytes + self.act_write_bytes)
