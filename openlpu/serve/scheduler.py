"""Continuous batching: one engine thread; requests join and leave between decode steps.

The HTTP side submits a Job and reads its events from an asyncio queue; the engine thread owns
every engine call (new_sequence, step, release), so the engine never sees two threads. The
waiting line is bounded: a full line is refused at once (never an unbounded wait).
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field

from openlpu.errors import OpenLPUError
from openlpu.serve.errors import APIError, server_error


@dataclass(frozen=True)
class JobEvent:
    text: str = ""  # text delta (stop-aware, may be empty)
    token_count: int = 0  # completion tokens this event adds
    finish_reason: str | None = None  # set on the last event
    error: APIError | None = None  # set instead when the job failed


@dataclass(eq=False)  # identity, not field equality: two identical prompts are two jobs
class Job:
    prompt_ids: list[int]
    params: object  # runtime.engine.SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    enqueued_s: float = field(default_factory=time.perf_counter)
    admitted_s: float | None = None
    first_token_s: float | None = None
    finished_s: float | None = None
    cancelled: bool = False
    seq: object = None  # the engine's Sequence while admitted

    def deliver(self, event: JobEvent) -> None:
        """Called on the engine thread; hands the event to the request's event loop."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    # Host-measured times, in seconds, as GroqCloud's usage reports them.
    @property
    def queue_time_s(self) -> float:
        return (self.admitted_s or self.enqueued_s) - self.enqueued_s

    @property
    def prompt_time_s(self) -> float:
        return (self.first_token_s - self.admitted_s) if self.first_token_s and self.admitted_s else 0.0

    @property
    def completion_time_s(self) -> float:
        return (self.finished_s - self.first_token_s) if self.finished_s and self.first_token_s else 0.0


class QueueFull(Exception):
    pass


def shutting_down() -> APIError:
    return APIError(503, "The server is shutting down.", code="service_unavailable")


class Scheduler:
    """Owns the engine loop thread. `max_queue` bounds the requests waiting beyond a full batch."""

    def __init__(self, engine, max_queue: int, on_step=None):
        self.engine = engine
        self.max_batch = engine.max_batch
        self.max_queue = max_queue
        self.on_step = on_step  # called (batch_size, seconds) after each engine step, for metrics
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: dict[int, Job] = {}  # Sequence.id -> job; engine thread only
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="openlpu-engine", daemon=True)

    # ---- HTTP side --------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """End every request, running or waiting, with a 503 after the engine's current step, and any submitted
        later at once; returns without waiting (a signal handler calls it)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def stop(self) -> None:
        self.close()
        self._thread.join(timeout=30)

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active_count(self) -> int:
        return len(self._active)

    def submit(self, prompt_ids: list[int], params) -> Job:
        job = Job(prompt_ids, params, asyncio.get_running_loop())
        with self._cond:
            if self._stopping:
                job.deliver(JobEvent(error=shutting_down()))
                return job
            if len(self._waiting) + len(self._active) >= self.max_batch + self.max_queue:
                raise QueueFull()
            self._waiting.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job from the line now, or free its slot at the next
        step boundary (the engine thread is the only one allowed to call engine.release)."""
        with self._cond:
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)
            self._cond.notify()

    # ---- engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._active:
                    self._cond.wait()
                if self._stopping:
                    break
            self._drop_cancelled()
            self._admit()
            if self._active:
                self._step()
        for job in list(self._active.values()):
            self._finish(job, JobEvent(error=shutting_down()))
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for job in waiting:
            job.deliver(JobEvent(error=shutting_down()))

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._active.values() if j.cancelled]:
            self._release(job)

    def _admit(self) -> None:
        while len(self._active) < self.max_batch:
            with self._cond:
                if not self._waiting:
                    return
                job = self._waiting.popleft()
            try:
                job.seq = self.engine.new_sequence(job.prompt_ids, job.params)
            except OpenLPUError as e:  # the engine refuses this prompt (the app checked the context)
                job.finished_s = time.perf_counter()
                job.deliver(JobEvent(error=APIError(400, str(e), param="messages")))
                continue
            except Exception as e:  # noqa: BLE001 - the server keeps serving
                job.deliver(JobEvent(error=server_error(f"The engine failed to start the request: {e}")))
                continue
            job.admitted_s = time.perf_counter()
            self._active[job.seq.id] = job

    def _step(self) -> None:
        jobs = list(self._active.values())
        t0 = time.perf_counter()
        try:
            events = self.engine.step([j.seq for j in jobs])
        except Exception as e:  # noqa: BLE001 - fail this batch, keep serving the next ones
            for job in jobs:
                self._finish(job, JobEvent(error=server_error(f"The engine failed during generation: {e}")))
            return
        now = time.perf_counter()
        if self.on_step:
            self.on_step(len(jobs), now - t0)
        for ev in events:
            job = self._active.get(ev.seq_id)
            if job is None:
                continue
            if job.first_token_s is None:
                job.first_token_s = now
            if ev.finished:
                job.finished_s = now
                self._finish(job, JobEvent(ev.text, 1, finish_reason=ev.finish_reason or "stop"))
            else:
                job.deliver(JobEvent(ev.text, 1))

    def _finish(self, job: Job, event: JobEvent) -> None:
        job.finished_s = job.finished_s or time.perf_counter()
        job.deliver(event)
        self._release(job)

    def _release(self, job: Job) -> None:
        self._active.pop(job.seq.id, None)
        try:
            self.engine.release(job.seq)
        except Exception:  # noqa: BLE001 - a failed release must not stop the loop
            pass
