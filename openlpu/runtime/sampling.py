"""Sampling parameters (validated) and next-token choice from logits.

Order of operations, as in Hugging Face's and llama.cpp's common samplers: temperature, then
top-k, then top-p (nucleus), then a draw from the renormalised distribution with the request's
own torch.Generator (so a seed reproduces a request whatever else the engine runs).
Temperature 0 means greedy (argmax), whatever the other settings; top-p 0 keeps the top token only. The
logits are shifted so their largest is 0 before the temperature divides them, so a temperature near 0 tends
to greedy rather than overflowing; one below float32's smallest normal number (which divides in float32 as 0
or next to it) is greedy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from openlpu.errors import OpenLPUError

MAX_TEMPERATURE = 2.0  # GroqCloud's documented range is 0..2
MAX_STOP_STRINGS = 4  # GroqCloud / OpenAI accept up to 4 stop sequences
GREEDY_BELOW_TEMPERATURE = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        self.validate()

    def validate(self) -> None:
        def number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) \
                or self.max_tokens < 1:
            raise OpenLPUError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not number(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise OpenLPUError(f"temperature must be between 0 and {MAX_TEMPERATURE}, "
                               f"got {self.temperature!r}")
        if not number(self.top_p) or not 0 <= self.top_p <= 1:
            raise OpenLPUError(f"top_p must be between 0 and 1, got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise OpenLPUError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not -(2**63) <= self.seed < 2**64):  # torch.Generator's range
            raise OpenLPUError(f"seed must be an integer from -2**63 to 2**64 - 1, got {self.seed!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise OpenLPUError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, "
                               f"got {len(self.stop)}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise OpenLPUError("stop strings must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The request's own random stream (None for greedy decoding, which draws nothing)."""
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def sample(logits: torch.Tensor, params: SamplingParams,
           generator: torch.Generator | None) -> int:
    """One token id from float32 logits [vocab]."""
    best = logits.argmax()  # a NaN is the maximum, so a non-finite row shows at its argmax
    if not torch.isfinite(logits[best]):
        raise OpenLPUError("the model computed logits that are not finite numbers (NaN or infinite): its weights "
                           "are likely corrupt; check the GGUF file against its source (its sha256)")
    if params.greedy:
        return int(best)
    logits = logits.float()
    logits = (logits - logits[best]) / params.temperature
    if params.top_k and params.top_k < logits.numel():
        values, ids = logits.topk(params.top_k)
    elif params.top_p < 1:
        values, ids = logits.sort(descending=True)
    else:  # the full distribution: no ordering needed
        values, ids = logits, None
    probs = values.softmax(-1)
    if params.top_p < 1:
        # keep the smallest prefix whose mass reaches top_p, and always the top token
        dropped = probs.cumsum(-1) - probs >= params.top_p
        dropped[0] = False
        probs = probs.masked_fill(dropped, 0.0)
    choice = torch.multinomial(probs, 1, generator=generator)
    return int(choice if ids is None else ids[choice])
