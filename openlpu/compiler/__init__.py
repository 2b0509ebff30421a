"""The LPU compiler: placement, static schedule and the Program they make; the verifier checks it."""

from __future__ import annotations

from openlpu.compiler.partition import kv_slots, partition
from openlpu.compiler.program import FORMAT_VERSION, Program, Workload, load_program
from openlpu.compiler.schedule import decode_period_cycles, decode_rows, schedule_phase
from openlpu.compiler.verify import Violation, verify, verify_or_raise
from openlpu.errors import OpenLPUError
from openlpu.hardware.lpu import SystemSpec
from openlpu.models.spec import ModelSpec


def compile_program(spec: ModelSpec, system: SystemSpec, workload: Workload, chips: int | None = None,
                    tp: int | None = None) -> Program:
    """Place the model on `chips` chips (None: as few as fit) in TP groups of `tp` chips (None: the
    compiler's choice) and schedule one decode step (one micro-batch of users) and one prefill. Same
    inputs, byte-identical Program."""
    if workload.context_length > spec.context_length:
        raise OpenLPUError(f"context {workload.context_length} is longer than {spec.name}'s context window "
                           f"({spec.context_length} tokens); use at most {spec.context_length}")
    placement = partition(spec, system, workload, chips, tp)
    templates: dict = {}  # collective routes, shared by both phases
    decode = schedule_phase(spec, system, workload, placement, "decode", templates)
    rows = decode_rows(workload.users, decode)
    while rows > 1:  # users share micro-batches: buffers for `rows` tokens, halved until they fit
        try:
            shared = partition(spec, system, workload, chips, tp, rows)
        except OpenLPUError:
            rows //= 2
            continue
        batched = schedule_phase(spec, system, workload, shared, "decode", templates, rows)
        # kept only if it serves every user sooner: a micro-batch's longer step can cost more than the turns
        if decode_period_cycles(system, batched, workload.users) < decode_period_cycles(system, decode, workload.users):
            placement, decode = shared, batched
        break
    return Program(version=FORMAT_VERSION, model=spec.name, system=system, workload=workload,
                   tensors=spec.tensor_shapes(),
                   kv_slots=tuple(kv_slots(spec, workload.context_length, i) for i in range(spec.n_layers)),
                   placement=placement, decode=decode,
                   prefill=schedule_phase(spec, system, workload, placement, "prefill", templates))


__all__ = ["Program", "Violation", "Workload", "compile_program", "load_program", "verify", "verify_or_raise"]
