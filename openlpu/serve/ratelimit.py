"""API keys and per-key limits on requests and tokens per minute, reported as GroqCloud does.

Each key has two token buckets that refill continuously (a full bucket per minute). GroqCloud's
headers: x-ratelimit-{limit,remaining,reset}-{requests,tokens}, resets as durations like "6s",
"391ms", "2m59.56s"; a 429 adds retry-after in seconds (GroqCloud API reference, rate limits page).
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from openlpu.errors import OpenLPUError
from openlpu.serve.errors import APIError

ANONYMOUS = ""  # the one identity when the server runs without keys


@dataclass(frozen=True)
class KeyLimits:
    """One key's own limits; None takes the server's default."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


KEY_LIMIT_FIELDS = {"rpm": "requests_per_minute", "tpm": "tokens_per_minute"}


def load_keys_file(path: str | Path) -> dict[str, KeyLimits]:
    """One key per line, optionally with its own limits: `KEY [rpm=N] [tpm=N]`; blank lines and
    lines starting with '#' are ignored."""
    p = Path(path)
    if not p.is_file():
        raise OpenLPUError(f"keys file {str(p)!r} not found; give a text file with one API key per line")
    keys: dict[str, KeyLimits] = {}
    for number, line in enumerate(p.read_text().splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        key, *options = words
        limits = {}
        for option in options:
            name, _, value = option.partition("=")
            if name not in KEY_LIMIT_FIELDS or not value.isdigit() or int(value) < 1:
                raise OpenLPUError(f"{p}:{number}: bad option {option!r}; write rpm=N or tpm=N "
                                   "(positive integers) after the key")
            limits[KEY_LIMIT_FIELDS[name]] = int(value)
        keys[key] = KeyLimits(**limits)
    if not keys:
        raise OpenLPUError(f"keys file {str(p)!r} holds no keys; put one API key per line")
    return keys


def key_label(key: str) -> str:
    """A name for a key that is safe to print and to put in messages (never the key itself)."""
    return "anonymous" if key == ANONYMOUS else "key_" + hashlib.sha256(key.encode()).hexdigest()[:10]


def format_duration(seconds: float) -> str:
    """GroqCloud's reset format: 391ms, 6s, 7.66s, 2m59.56s."""
    if seconds < 1.0:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, secs = divmod(seconds, 60.0)
    secs_text = f"{secs:.2f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{secs_text}" if minutes else secs_text


@dataclass
class Bucket:
    """A budget of `limit_per_minute` that refills continuously at limit/60 per second."""

    limit_per_minute: int
    level: float
    updated_s: float

    @property
    def refill_per_s(self) -> float:
        return self.limit_per_minute / 60.0

    def refill(self, now_s: float) -> None:
        self.level = min(self.limit_per_minute, self.level + (now_s - self.updated_s) * self.refill_per_s)
        self.updated_s = now_s

    def wait_s(self, amount: float) -> float:
        return max(0.0, (amount - self.level) / self.refill_per_s)

    def reset_s(self) -> float:
        return (self.limit_per_minute - self.level) / self.refill_per_s


# Which resource, its GroqCloud abbreviation and its 429 `type`.
RESOURCES = (("requests", "requests per minute (RPM)"), ("tokens", "tokens per minute (TPM)"))


class RateLimiter:
    """Per-key RPM and TPM. Tokens are charged as prompt + asked-for completion up front, then
    settled to the real count when the request ends."""

    def __init__(self, requests_per_minute: int, tokens_per_minute: int,
                 per_key: dict[str, KeyLimits] | None = None, clock=time.monotonic):
        if requests_per_minute < 1 or tokens_per_minute < 1:
            raise OpenLPUError("--rpm and --tpm must be at least 1")
        self.defaults = KeyLimits(requests_per_minute, tokens_per_minute)
        self.per_key = per_key or {}
        self.clock = clock
        self._buckets: dict[tuple[str, str], Bucket] = {}
        self._lock = threading.Lock()

    def _bucket(self, key: str, resource: str, now_s: float) -> Bucket:
        b = self._buckets.get((key, resource))
        if b is None:
            limit = self.limit(key, resource)
            b = self._buckets[(key, resource)] = Bucket(limit, float(limit), now_s)
        b.refill(now_s)
        return b

    def limit(self, key: str, resource: str) -> int:
        field_name = f"{resource}_per_minute"
        own = getattr(self.per_key.get(key, KeyLimits()), field_name)
        return own if own is not None else getattr(self.defaults, field_name)

    def take(self, key: str, tokens: int, model: str) -> None:
        """Admit one request asking for `tokens`, or raise 413 / 429 as GroqCloud does."""
        wanted = {"requests": 1, "tokens": tokens}
        with self._lock:
            now = self.clock()
            buckets = {r: self._bucket(key, r, now) for r, _ in RESOURCES}
            where = f"for model `{model}` in organization `{key_label(key)}` service tier `on_demand`"
            if tokens > buckets["tokens"].limit_per_minute:
                raise APIError(413, f"Request too large {where} on tokens per minute (TPM): "
                                    f"Limit {buckets['tokens'].limit_per_minute}, Requested {tokens}, please reduce "
                                    "your message size or max_completion_tokens and try again.",
                               code="rate_limit_exceeded", type="tokens")
            for resource, title in RESOURCES:
                b = buckets[resource]
                wait = b.wait_s(wanted[resource])
                if wait > 0:
                    used = b.limit_per_minute - math.floor(b.level)
                    raise APIError(429, f"Rate limit reached {where} on {title}: Limit {b.limit_per_minute}, "
                                        f"Used {used}, Requested {wanted[resource]}. "
                                        f"Please try again in {format_duration(wait)}.",
                                   code="rate_limit_exceeded", type=resource,
                                   headers={"retry-after": str(max(1, math.ceil(wait))),
                                            **self._headers(buckets)})
            for resource, _ in RESOURCES:
                buckets[resource].level -= wanted[resource]

    def settle_tokens(self, key: str, charged: int, used: int) -> None:
        """Replace the up-front token charge by what the request really used (may go negative:
        the next requests then wait, as a real meter would make them)."""
        with self._lock:
            self._bucket(key, "tokens", self.clock()).level += charged - used

    def refund_request(self, key: str, tokens: int) -> None:
        """Give back a request that was admitted here but never ran (e.g. the queue was full)."""
        with self._lock:
            now = self.clock()
            for resource, amount in (("requests", 1), ("tokens", tokens)):
                b = self._bucket(key, resource, now)
                b.level = min(b.limit_per_minute, b.level + amount)

    def headers(self, key: str) -> dict[str, str]:
        with self._lock:
            now = self.clock()
            return self._headers({r: self._bucket(key, r, now) for r, _ in RESOURCES})

    @staticmethod
    def _headers(buckets: dict[str, Bucket]) -> dict[str, str]:
        h = {}
        for resource, b in buckets.items():
            h[f"x-ratelimit-limit-{resource}"] = str(b.limit_per_minute)
            h[f"x-ratelimit-remaining-{resource}"] = str(max(0, math.floor(b.level)))
            h[f"x-ratelimit-reset-{resource}"] = format_duration(b.reset_s())
        return h
