"""Speculative decoding: a small draft model proposes k tokens one at a time, then the target model
verifies them in one decode step of k + 1 new tokens per user (the Program's Workload.draft_tokens),
keeping the drafts up to the first it rejects and adding one token of its own.

If each draft is accepted with probability `acceptance`, independently, a round yields
(1 - acceptance^(k+1)) / (1 - acceptance) tokens on average (Leviathan, Kalman and Matias, "Fast
Inference from Transformers via Speculative Decoding", ICML 2023, equation 1). The acceptance rate
depends on the two models and on the text, so the user states it; nothing here fits it.

Where the draft runs:
- LPU: on chips of its own (the target fills its SRAM), from a node boundary after the target's
  chips, with its own compiled Program. A user's round is k draft steps, the hop to the target, the
  verifying step, and the hop back. Each pipeline serves other users meanwhile, so with many users in
  flight a round comes as often as the busier of the two pipelines allows.
- GPU: on the target's GPUs, its steps between the target's: a round is k draft steps plus one
  verifying step of the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from openlpu.errors import OpenLPUError, check_count


@dataclass(frozen=True)
class SpeculativeRound:
    draft_tokens: int
    acceptance: float
    tokens_per_round: float  # expected tokens each user gains per round
    round_latency_s: float  # one user's round, nothing else in its way
    round_period_s: float  # time between one user's rounds with every user in flight
    tokens_per_s_per_user: float
    throughput_tokens_per_s: float


def check(draft_tokens: int, acceptance: float) -> None:
    check_count(draft_tokens, "--draft-tokens")
    if isinstance(acceptance, bool) or not isinstance(acceptance, (int, float)) or not 0 <= acceptance <= 1:
        raise OpenLPUError(f"--acceptance must be between 0 and 1 (the chance the target accepts a draft token), "
                           f"got {acceptance!r}")


def expected_tokens(draft_tokens: int, acceptance: float) -> float:
    """Tokens a round yields on average: the accepted drafts plus the target's own token (all k + 1 when
    every draft is accepted)."""
    check(draft_tokens, acceptance)
    if acceptance == 1:
        return draft_tokens + 1.0
    return (1 - acceptance ** (draft_tokens + 1)) / (1 - acceptance)


def _round(draft_tokens: int, acceptance: float, users: int, latency_s: float, period_s: float) -> SpeculativeRound:
    tokens = expected_tokens(draft_tokens, acceptance)
    return SpeculativeRound(draft_tokens, acceptance, tokens, latency_s, period_s, tokens / period_s,
                            users * tokens / period_s)


def lpu_round(verify, draft, handoff_s: float, draft_tokens: int, acceptance: float) -> SpeculativeRound:
    """`verify`, `draft`: sim.timing.LpuTiming of the target's Program (compiled with draft_tokens) and
    of the draft's; handoff_s: both hops between them. Each Program's period (1 / its step rate per
    user) already counts the users in flight on its own pipeline."""
    latency = draft_tokens * draft.decode_latency_s + verify.decode_latency_s + handoff_s
    period = max(latency, draft_tokens / draft.tokens_per_s_per_user, 1 / verify.tokens_per_s_per_user)
    return _round(draft_tokens, acceptance, verify.users, latency, period)


def gpu_round(verify, draft, draft_tokens: int, acceptance: float) -> SpeculativeRound:
    """`verify`, `draft`: sim.gpu.GpuTiming of the target's verifying steps and of the draft's, on the
    same GPUs for the same batch; their steps take turns."""
    latency = draft_tokens * draft.decode_step_s + verify.decode_step_s
    return _round(draft_tokens, acceptance, verify.users, latency, latency)
