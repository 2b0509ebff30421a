"""The simulated LPU figures the server adds to each response (the "x_openlpu" extension).

They are read off the compiled Program by openlpu.sim.timing, never measured, and never mixed into
GroqCloud's `usage` (which holds real host seconds)."""

from __future__ import annotations

from openlpu.compiler import Program
from openlpu.serve.app import SimulatedLPUHook
from openlpu.sim.timing import timing


def program_hook(program: Program) -> SimulatedLPUHook:
    """(prompt_tokens, completion_tokens) -> what this request would take on the Program's system."""
    t = timing(program)
    base = {"label": "simulated", "system": program.system.name, "chips": t.chips,
            "pipeline_stages": t.stages, "tensor_parallel": t.tp,
            "output_tokens_per_s": t.tokens_per_s_per_user, "decode_latency_s": t.decode_latency_s,
            "ttft_s_for_compiled_prompt": t.ttft_s, "compiled_prompt_tokens": program.workload.prompt_len}

    def hook(prompt_tokens: int, completion_tokens: int) -> dict:
        return {**base, "completion_time_s": completion_tokens / t.tokens_per_s_per_user}

    return hook
