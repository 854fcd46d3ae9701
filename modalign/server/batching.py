"""Micro-batching: concurrent queries share one encoder forward pass and one search call.

One worker thread owns the model (encoders run under ``torch.inference_mode()`` there, off
the event loop). Requests put a :class:`Job` on its queue and await a future. The worker takes
the first job, then everything else already waiting (up to ``max_batch``): no timer, so a lone
query waits for nothing, and under load a batch holds whatever arrived during the previous
one. Decoded values of one modality are encoded together; all vectors are then searched with
:meth:`Searcher.search`, whose per-query results equal one-at-a-time search. If a batch's
forward pass fails, its jobs are retried one by one so that only the bad one fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modalign.retrieval.index.corpus import Hit, Query
from modalign.server.errors import RequestError
from modalign.server.searcher import Searcher

__all__ = ["BatchStats", "Job", "MicroBatcher"]

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One query for the worker: a decoded value of ``modality`` or a ready ``vector``."""

    k: int
    targets: tuple[str, ...]
    modality: str | None = None
    prepared: Any = None
    vector: np.ndarray | None = None
    future: Future = field(default_factory=Future)


@dataclass
class BatchStats:
    """Counters for ``/info``: how many batches, queries, and the largest batch seen."""

    batches: int = 0
    queries: int = 0
    largest: int = 0

    def to_dict(self) -> dict[str, Any]:
        mean = self.queries / self.batches if self.batches else 0.0
        return {
            "batches": self.batches,
            "queries": self.queries,
            "largest": self.largest,
            "mean": round(mean, 2),
        }


class MicroBatcher:
    """The encoder/search worker thread and its bounded queue."""

    def __init__(self, searcher: Searcher, max_batch: int = 32, max_pending: int = 256) -> None:
        self.searcher, self.max_batch = searcher, max_batch
        self.stats = BatchStats()
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_pending)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="modalign-encoder", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish queued jobs, then end the worker."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    async def run(self, job: Job) -> list[Hit]:
        """Queue ``job`` and wait for its hits (503 when the queue is full)."""
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise RequestError(
                503, "server", "too many queries are waiting; retry in a moment"
            ) from None
        return await asyncio.wrap_future(job.future)

    # -- worker side -----------------------------------------------------------------------
    def _run(self) -> None:
        self.searcher.warm_up()  # in this thread: the one that will run every forward pass
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs = [first]
            stop = False
            while len(jobs) < self.max_batch:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                jobs.append(job)
            self._process(jobs)
            if stop:
                return

    def _process(self, jobs: list[Job]) -> None:
        self.stats.batches += 1
        self.stats.queries += len(jobs)
        self.stats.largest = max(self.stats.largest, len(jobs))
        ready = self._encode(jobs)
        if not ready:
            return
        try:
            answers = self.searcher.search([Query(v, j.k, j.targets) for j, v in ready])
        except Exception as exc:
            for job, _ in ready:
                _fail(job, exc)
            return
        for (job, _), hits in zip(ready, answers):
            _resolve(job, hits)

    def _encode(self, jobs: list[Job]) -> list[tuple[Job, np.ndarray]]:
        """(job, vector) for every job that got a vector; the others' futures hold the error."""
        groups: dict[str, list[Job]] = {}
        vectors: dict[int, np.ndarray] = {}
        for job in jobs:
            if job.vector is not None:
                vectors[id(job)] = job.vector
            else:
                groups.setdefault(str(job.modality), []).append(job)
        for modality, group in groups.items():
            try:
                encoded = self.searcher.encode(modality, [j.prepared for j in group])
                vectors.update({id(j): v for j, v in zip(group, encoded)})
            except Exception:
                log.warning(
                    "a batch of %d %s queries failed; retrying one by one", len(group), modality
                )
                for job in group:
                    try:
                        vectors[id(job)] = self.searcher.encode(modality, [job.prepared])[0]
                    except Exception as exc:
                        _fail(job, exc)
        return [(j, vectors[id(j)]) for j in jobs if id(j) in vectors]


def _resolve(job: Job, hits: list[Hit]) -> None:
    with contextlib.suppress(InvalidStateError):  # the client went away: future cancelled
        job.future.set_result(hits)


def _fail(job: Job, exc: Exception) -> None:
    with contextlib.suppress(InvalidStateError):
        job.future.set_exception(exc)
