"""The LPU compiler: placement, static schedule and the Program they make; the verifier checks it."""

from __future__ import annotations

from openlpu.compiler.partition import kv_slots, partition
from openlpu.compiler.program import (
    FORMAT_VERSION,
    PhaseSchedule,
    Placement,
    Program,
    Workload,
    load_program,
)
from openlpu.compiler.schedule import decode_period_cycles, decode_rows, schedule_phase
from openlpu.compiler.verify import Violation, verify, verify_or_raise
from openlpu.errors import OpenLPUError
from openlpu.hardware.lpu import SystemSpec
from openlpu.models.spec import ModelSpec


def compile_program(spec: ModelSpec, system: SystemSpec, workload: Workload, chips: int | None = None,
                    tp: int | None = None) -> Program:
    """Place the model on `chips` chips (None: as few as fit) in TP groups of `tp` chips (None: the
    compiler's choice) and schedule one decode step (one micro-batch of users) and one prefill: the
    stages arranged for the shortest step, or as even as can be (partition's `balance`), whichever gives
    each user tokens sooner. Same inputs, byte-identical Program."""
    if workload.context_length > spec.context_length:
        raise OpenLPUError(f"context {workload.context_length} is longer than {spec.name}'s context window "
                           f"({spec.context_length} tokens); use at most {spec.context_length}")
    templates, users = {}, workload.users  # templates: collective routes, shared by every schedule
    spread = partition(spec, system, workload, chips, tp)
    placement, decode = _decode_schedule(spec, system, workload, chips, tp, spread, False, templates)
    # even stages can still be faster: with users in flight the busiest stage may bound the step, and the
    # balanced arrangement cuts pieces where stages fill, which can suit a model whose MLPs cannot be cut
    if (even := partition(spec, system, workload, chips, tp, balance=True)) != spread:
        balanced = _decode_schedule(spec, system, workload, chips, tp, even, True, templates)
        if decode_period_cycles(system, balanced[1], users) < decode_period_cycles(system, decode, users):
            placement, decode = balanced
    return Program(version=FORMAT_VERSION, model=spec.name, system=system, workload=workload,
                   tensors=spec.tensor_shapes(),
                   kv_slots=tuple(kv_slots(spec, workload.context_length, i) for i in range(spec.n_layers)),
                   placement=placement, decode=decode,
                   prefill=schedule_phase(spec, system, workload, placement, "prefill", templates))


def _decode_schedule(spec: ModelSpec, system: SystemSpec, workload: Workload, chips: int | None, tp: int | None,
                     placement: Placement, balance: bool, templates: dict) -> tuple[Placement, PhaseSchedule]:
    """The decode step of a placement arranged with partition's `balance`, or of one like it with buffers
    for micro-batches of several users where that serves each of them sooner."""
    decode, users = schedule_phase(spec, system, workload, placement, "decode", templates), workload.users
    rows = decode_rows(users, decode)
    while rows > 1:  # users share micro-batches: buffers for `rows` tokens, halved until they fit
        try:
            shared = partition(spec, system, workload, chips, tp, rows, balance)
        except OpenLPUError:
            rows //= 2
            continue
        batched = schedule_phase(spec, system, workload, shared, "decode", templates, rows)
        # kept only if it serves every user sooner: a micro-batch's longer step can cost more than the turns
        if decode_period_cycles(system, batched, users) < decode_period_cycles(system, decode, users):
            return shared, batched
        break
    return placement, decode


__all__ = ["Program", "Violation", "Workload", "compile_program", "load_program", "verify", "verify_or_raise"]
