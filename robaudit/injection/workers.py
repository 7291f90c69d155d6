"""Campaigns past one process: a pool of contained onnxruntime children, a Ray backend, and a
generic deterministic split of work items over processes (docs/method.md §8.3).

Determinism does not depend on the split: the fault sets are drawn by the parent before any
work is handed out, work is cut into the same requests a single process would make, and each
request is evaluated whole by one worker. A worker only changes *where* a request runs, never
*what* it contains, so the per-set errors are the same bits whatever the number of workers.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, replace
from multiprocessing import get_context
from typing import Any, TypeVar

import numpy as np

from robaudit.errors import InjectionRuntimeError, OptionError
from robaudit.injection.instrument import FaultBatch, Instrumented
from robaudit.injection.sandbox import Evaluation, IsolatedEvaluator, Limits, open_evaluator
from robaudit.limits import usable_cores

BACKENDS = ("local", "ray")

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Runner:
    """Where a campaign's fault sets are evaluated."""

    #: Worker processes (local) or Ray actors (ray); each runs one onnxruntime session.
    workers: int = 1
    #: ``local`` (child processes on this machine) or ``ray`` (a Ray cluster).
    backend: str = "local"
    #: Ray cluster address (``ray://host:10001`` or ``auto``); None: a local Ray started here.
    address: str | None = None
    #: (I, N): evaluate only the I-th of N deterministic slices of a random campaign (0 ≤ I < N).
    shard: tuple[int, int] | None = None
    #: Cores shared by the workers (None: this machine's usable cores).
    cores: int | None = None

    def check(self, isolate: bool) -> None:
        """Refuse nonsense values before any work is done."""
        if self.workers < 1:
            raise OptionError(f"--workers must be at least 1, got {self.workers}")
        if self.backend not in BACKENDS:
            raise OptionError(f"--backend must be one of {', '.join(BACKENDS)}, got '{self.backend}'")
        if self.address is not None and self.backend != "ray":
            raise OptionError("--address needs --backend ray")
        if self.backend == "local" and self.workers > 1 and not isolate:
            raise OptionError("--workers runs onnxruntime in child processes; drop --in-process")
        if self.shard is not None:
            index, count = self.shard
            if count < 1 or not 0 <= index < count:
                raise OptionError(f"--shard I/N needs N ≥ 1 and 0 ≤ I < N, got {index}/{count}")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``I/N`` → (I, N); raises :class:`OptionError` for anything else or I outside 0..N−1."""
    if text is None:
        return None
    index, sep, count = text.partition("/")
    try:
        shard = (int(index), int(count))
    except ValueError:
        shard = None
    if not sep or shard is None or shard[1] < 1 or not 0 <= shard[0] < shard[1]:
        raise OptionError(f"--shard takes I/N with 0 ≤ I < N (e.g. 0/4 … 3/4), got '{text}'")
    return shard


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    """onnxruntime intra-op threads per worker so that workers × threads ≤ cores (at least 1)."""
    return max(1, (cores or usable_cores()) // max(1, workers))


def split_evenly(count: int, parts: int) -> list[range]:
    """Cut ``range(count)`` into ``parts`` contiguous slices whose sizes differ by at most one.

    Slice i is ``range(i·count // parts, (i+1)·count // parts)``: a pure function of
    (count, parts), so every process (or job-array task) computes the same cut.
    """
    if parts < 1:
        raise OptionError(f"cannot split work into {parts} parts")
    return [range(i * count // parts, (i + 1) * count // parts) for i in range(parts)]


def map_in_processes(function: Callable[[T], R], items: Sequence[T], workers: int) -> list[R]:
    """``[function(item) for item in items]`` in ``workers`` fresh processes, results in order.

    ``function`` must be a module-level callable and items/results picklable. The items are
    split with :func:`split_evenly` (contiguous, deterministic); ``workers`` ≤ 1 runs here.
    An exception raised by ``function`` is raised here.
    """
    if workers <= 1 or len(items) <= 1:
        return [function(item) for item in items]
    slices = [list(items[r.start : r.stop]) for r in split_evenly(len(items), min(workers, len(items)))]
    context, count = get_context("spawn"), len(slices)
    try:
        with ProcessPoolExecutor(count, mp_context=context, initializer=_share_cores, initargs=(count,)) as pool:
            try:
                with _interrupts_held():  # the workers start (at submit) with Ctrl-C blocked
                    futures = [pool.submit(_map_slice, function, chunk) for chunk in slices]
                return [result for future in futures for result in future.result()]
            except BaseException:
                with _interrupts_held():  # a second Ctrl-C waits until every worker is ended
                    _stop_workers(pool)
                raise
    except BrokenProcessPool:
        raise InjectionRuntimeError(WORKER_ENDED) from None


#: Why a pool's worker ended before returning its slice. Each worker is a fresh Python ("spawn": forking a process
#: that holds onnxruntime's threads is unsafe) which imports the caller's main script again: a script without the
#: guard starts its own workers there, which Python stops (a new-user trial saw a bare BrokenProcessPool traceback).
WORKER_ENDED = (
    "a worker process ended before returning its work: killed (out of memory?), or started from a Python script "
    "whose top-level code is not under `if __name__ == \"__main__\":` (each worker imports the script again; "
    "docs/api.md) — run with workers=1, or guard the script"
)


@contextmanager
def _interrupts_held() -> Iterator[None]:
    """SIGINT blocked in this thread while the block runs, so that the processes it starts inherit the blocked
    signal: a terminal's Ctrl-C reaches the whole process group, and a worker that got it while Python started
    or imported its modules printed a KeyboardInterrupt traceback under the report. Blocked, not ignored: a
    Ctrl-C meanwhile waits and reaches this process when the block ends (an ignored one would be lost); the
    workers keep it blocked, and the parent ends them (:func:`_stop_workers`). Without signal masks (Windows),
    and outside the main thread (a Python caller's own thread: Ctrl-C raises in the main thread only, so this
    call could not end the workers on it), nothing changes: the workers get the terminal's Ctrl-C themselves."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """End the pool's worker processes now (Ctrl-C does not reach them, and a slice already handed to a worker cannot be
    cancelled: leaving the pool would wait for it). ``terminate_workers`` where Python has it (3.14), else each
    process the pool holds."""
    terminate = getattr(pool, "terminate_workers", None)
    if terminate is not None:  # pragma: no cover - Python ≥ 3.14
        terminate()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


def _share_cores(workers: int) -> None:
    """In a worker process: the tight pass's threads (``ROBAUDIT_THREADS``) a share of the cores, so that
    workers × threads ≤ cores — unless the user set the variable."""
    os.environ.setdefault("ROBAUDIT_THREADS", str(threads_per_worker(workers)))


def _map_slice(function: Callable[[Any], Any], chunk: list) -> list:
    return [function(item) for item in chunk]


# --------------------------------------------------------------------------- evaluating requests


def evaluate_parts(evaluator: Any, parts: Sequence[FaultBatch], index: np.ndarray | None) -> Iterator[Evaluation]:
    """The evaluations of ``parts`` in order, on whatever workers ``evaluator`` has.

    Every answer is checked to hold one row per fault set sent: a lost or truncated answer
    raises :class:`InjectionRuntimeError` instead of shrinking the campaign.
    """
    run = getattr(evaluator, "evaluate_parts", None)
    answers: Iterable[Evaluation] = (
        run(parts, index) if run is not None else (evaluator.evaluate(p, index) for p in parts)
    )
    for part, answer in zip(parts, answers, strict=True):
        if answer.errors.shape[0] != part.count:
            raise InjectionRuntimeError(
                f"a worker returned {answer.errors.shape[0]} of the {part.count} fault sets it was sent"
            )
        yield answer


class WorkerPool:
    """``workers`` contained onnxruntime children (:class:`IsolatedEvaluator`), used as one evaluator."""

    def __init__(self, spec: Instrumented, inputs: np.ndarray, limits: Limits, workers: int, cores: int | None = None):
        limits = replace(limits, threads=threads_per_worker(workers, cores))
        self.children: list[IsolatedEvaluator] = []
        try:
            for _ in range(workers):  # start them all, then wait: the sessions build in parallel
                self.children.append(IsolatedEvaluator(spec, inputs, limits, wait=False))
            for child in self.children:
                child.wait_ready()
        except BaseException:
            self.close()
            raise
        self.clean_run = self.children[0].clean_run
        for child in self.children[1:]:
            if not np.array_equal(child.clean_run.outputs, self.clean_run.outputs):
                self.close()
                raise InjectionRuntimeError("the workers' onnxruntime sessions disagree on the clean outputs")

    def evaluate(self, batch: FaultBatch, index: np.ndarray | None = None) -> Evaluation:
        """One request, on the first worker."""
        return self.children[0].evaluate(batch, index)

    def evaluate_parts(self, parts: Sequence[FaultBatch], index: np.ndarray | None) -> Iterator[Evaluation]:
        """Keep every worker busy with whole requests; answers come back in request order."""
        free: deque[IsolatedEvaluator] = deque(self.children)
        pending: deque[IsolatedEvaluator] = deque()
        following = 0
        while following < len(parts) or pending:
            while free and following < len(parts):
                child = free.popleft()
                child.submit(parts[following], index)
                pending.append(child)
                following += 1
            child = pending.popleft()
            yield child.collect()
            free.append(child)

    def close(self) -> None:
        """Stop every child."""
        for child in self.children:
            child.close()


def open_runner(spec: Instrumented, inputs: np.ndarray, limits: Limits, isolate: bool, runner: Runner) -> Any:
    """The evaluator of a campaign: one child (or this process), a :class:`WorkerPool`, or Ray actors."""
    if runner.backend == "ray":
        from robaudit.injection.ray_backend import RayPool

        return RayPool(spec, inputs, limits, runner.workers, runner.address)
    if runner.workers > 1:
        return WorkerPool(spec, inputs, limits, runner.workers, runner.cores)
    if runner.cores is not None:
        limits = replace(limits, threads=threads_per_worker(1, runner.cores))
    return open_evaluator(spec, inputs, limits, isolate)
