"""API keys and per-key limits on requests per minute and per day and tokens per minute, reported as
GroqCloud does.

Each key has a bucket per limit that refills continuously (a full bucket per minute, or per day). GroqCloud's
headers: x-ratelimit-{limit,remaining,reset}-{requests,tokens}, the requests ones always of the requests per
day (RPD), the tokens ones of the tokens per minute (TPM); resets as durations like "6s", "391ms",
"2m59.56s"; a 429 adds retry-after in seconds (GroqCloud API reference, rate limits page).
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
    requests_per_day: int | None = None  # None: the server's, or, where it has none, a day of the RPM


KEY_LIMIT_FIELDS = {"rpm": "requests_per_minute", "tpm": "tokens_per_minute", "rpd": "requests_per_day"}
MINUTES_PER_DAY = 24 * 60


def load_keys_file(path: str | Path) -> dict[str, KeyLimits]:
    """One key per line, optionally with its own limits: `KEY [rpm=N] [tpm=N] [rpd=N]`; blank lines and
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
                raise OpenLPUError(f"{p}:{number}: bad option {option!r}; write rpm=N, tpm=N or rpd=N "
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
    """GroqCloud's reset format (Go's durations): 391ms, 6s, 7.66s, 2m59.56s, 8h0m0s; rounded before it is split,
    so that 59.999 s reads 1m0s, not 60s."""
    if (ms := max(0, round(seconds * 1000))) < 1000:
        return f"{ms}ms"
    minutes, secs = divmod(round(seconds, 2), 60.0)
    hours, minutes = divmod(int(minutes), 60)
    secs_text = f"{secs:.2f}".rstrip("0").rstrip(".") + "s"
    return (f"{hours}h{minutes}m" if hours else f"{minutes}m" if minutes else "") + secs_text


@dataclass
class Bucket:
    """A budget of `limit` per `window_s` that refills continuously at limit / window_s per second."""

    limit: int
    window_s: float
    level: float
    updated_s: float

    @property
    def refill_per_s(self) -> float:
        return self.limit / self.window_s

    def refill(self, now_s: float) -> None:
        self.level = min(self.limit, self.level + (now_s - self.updated_s) * self.refill_per_s)
        self.updated_s = now_s

    def wait_s(self, amount: float) -> float:
        return max(0.0, (amount - self.level) / self.refill_per_s)

    def reset_s(self) -> float:
        return (self.limit - self.level) / self.refill_per_s


@dataclass(frozen=True)
class Resource:
    name: str  # its bucket
    limit_field: str  # KeyLimits'
    window_s: float
    title: str  # as GroqCloud's 429 names it
    unit: str  # what a request takes of it (one request, or its tokens), and the 429's `type`


REQUESTS_PER_MINUTE = Resource("requests", "requests_per_minute", 60, "requests per minute (RPM)", "requests")
RESOURCES = (REQUESTS_PER_MINUTE,
             Resource("tokens", "tokens_per_minute", 60, "tokens per minute (TPM)", "tokens"),
             Resource("daily_requests", "requests_per_day", MINUTES_PER_DAY * 60, "requests per day (RPD)", "requests"))
HEADER_BUCKETS = {"requests": "daily_requests", "tokens": "tokens"}  # x-ratelimit-*-{requests,tokens}: RPD, TPM


class RateLimiter:
    """Per-key RPM, RPD and TPM. Tokens are charged as prompt + asked-for completion up front, then
    settled to the real count when the request ends."""

    def __init__(self, requests_per_minute: int, tokens_per_minute: int,
                 per_key: dict[str, KeyLimits] | None = None, clock=time.monotonic,
                 requests_per_day: int | None = None):
        given = (("rpm", requests_per_minute), ("tpm", tokens_per_minute), ("rpd", requests_per_day))
        if bad := [f"--{flag} {v}" for flag, v in given if v is not None and v < 1]:
            raise OpenLPUError(f"{', '.join(bad)}: --rpm, --tpm and --rpd must be at least 1")
        self.defaults = KeyLimits(requests_per_minute, tokens_per_minute, requests_per_day)
        self.per_key = per_key or {}
        self.clock = clock
        self._buckets: dict[tuple[str, str], Bucket] = {}
        self._lock = threading.Lock()

    def _bucket(self, key: str, resource: Resource, now_s: float) -> Bucket:
        b = self._buckets.get((key, resource.name))
        if b is None:
            limit = self.limit(key, resource)
            b = self._buckets[(key, resource.name)] = Bucket(limit, resource.window_s, float(limit), now_s)
        b.refill(now_s)
        return b

    def _buckets_of(self, key: str) -> dict[str, Bucket]:
        now = self.clock()
        return {r.name: self._bucket(key, r, now) for r in RESOURCES}

    def limit(self, key: str, resource: Resource) -> int:
        own, default = (getattr(limits, resource.limit_field) for limits in (self.per_key.get(key, KeyLimits()),
                                                                             self.defaults))
        if own is None and default is None:  # no requests per day set: a day of the key's requests per minute
            return self.limit(key, REQUESTS_PER_MINUTE) * MINUTES_PER_DAY
        return own if own is not None else default

    def take(self, key: str, tokens: int, model: str) -> None:
        """Admit one request asking for `tokens`, or raise 413 / 429 as GroqCloud does."""
        wanted = {"requests": 1, "tokens": tokens}
        with self._lock:
            buckets = self._buckets_of(key)
            where = f"for model `{model}` in organization `{key_label(key)}` service tier `on_demand`"
            if tokens > buckets["tokens"].limit:
                raise APIError(413, f"Request too large {where} on tokens per minute (TPM): "
                                    f"Limit {buckets['tokens'].limit}, Requested {tokens}, please reduce "
                                    "your message size or max_completion_tokens and try again.",
                               code="rate_limit_exceeded", type="tokens")
            for r in RESOURCES:
                b = buckets[r.name]
                wait = b.wait_s(wanted[r.unit])
                if wait > 0:
                    used = b.limit - math.floor(b.level)
                    raise APIError(429, f"Rate limit reached {where} on {r.title}: Limit {b.limit}, "
                                        f"Used {used}, Requested {wanted[r.unit]}. "
                                        f"Please try again in {format_duration(wait)}.",
                                   code="rate_limit_exceeded", type=r.unit,
                                   headers={"retry-after": str(max(1, math.ceil(wait))),
                                            **self._headers(buckets)})
            for r in RESOURCES:
                buckets[r.name].level -= wanted[r.unit]

    def settle_tokens(self, key: str, charged: int, used: int) -> None:
        """Replace the up-front token charge by what the request really used (may go negative:
        the next requests then wait, as a real meter would make them)."""
        with self._lock:
            self._buckets_of(key)["tokens"].level += charged - used

    def refund_request(self, key: str, tokens: int) -> None:
        """Give back a request that was admitted here but never ran (e.g. the queue was full)."""
        given = {"requests": 1, "tokens": tokens}
        with self._lock:
            buckets = self._buckets_of(key)
            for r in RESOURCES:
                b = buckets[r.name]
                b.level = min(b.limit, b.level + given[r.unit])

    def headers(self, key: str) -> dict[str, str]:
        with self._lock:
            return self._headers(self._buckets_of(key))

    @staticmethod
    def _headers(buckets: dict[str, Bucket]) -> dict[str, str]:
        h = {}
        for header, bucket in HEADER_BUCKETS.items():
            b = buckets[bucket]
            h[f"x-ratelimit-limit-{header}"] = str(b.limit)
            h[f"x-ratelimit-remaining-{header}"] = str(max(0, math.floor(b.level)))
            h[f"x-ratelimit-reset-{header}"] = format_duration(b.reset_s())
        return h
