"""Ray as the engine past one machine: the campaign's requests run on Ray actors
(docs/method.md §8.3).

Each actor hosts one :class:`~robaudit.injection.sandbox.Evaluator` (one onnxruntime session) on
whichever node Ray places it. An actor that dies (its node lost, onnxruntime killed) is
restarted by Ray from the same instrumented model and inputs, and the request it held is
retried (``max_restarts``/``max_task_retries``): a request is never dropped, and the
campaign checks that every fault set it sent came back. Ray is an optional extra
(``pip install 'robaudit[ray]'``); it is imported only here.
"""

from __future__ import annotations

import os
import socket
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from robaudit.errors import InjectionRuntimeError, OptionError
from robaudit.injection.instrument import FaultBatch, Instrumented
from robaudit.injection.sandbox import Evaluation, Evaluator, Limits

#: Seconds to wait for a TCP connection to the cluster's address before calling it unreachable.
PROBE_TIMEOUT_S = 5.0
#: How often Ray restarts a lost actor and retries its request before the campaign fails.
RETRIES = 3


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise OptionError("--backend ray needs Ray: pip install 'robaudit[ray]'") from None
    return ray


def _probe(address: str) -> None:
    """Refuse at once an address with nothing listening (Ray itself retries for minutes)."""
    where = address.removeprefix("ray://")
    host, sep, port = where.rpartition(":")
    if address == "auto" or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OptionError(f"cannot reach a Ray cluster at '{address}': {reason}") from None


def connect(address: str | None) -> Any:
    """The ``ray`` module, connected to ``address`` (None: a local Ray started in this process).

    Raises :class:`OptionError` (one line) when Ray is not installed or the cluster cannot be reached.
    """
    ray = _ray()
    if ray.is_initialized():
        return ray
    if address is not None:
        _probe(address)
    try:
        if address is None:
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except Exception as exc:
        where = f"at '{address}'" if address else "locally"
        text = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise OptionError(f"cannot reach a Ray cluster {where}: {text}") from None
    return ray


class _Worker:
    """The body of a Ray actor: one evaluator; ``fail_marker`` makes the first request die (tests)."""

    def __init__(self, spec: Instrumented, inputs: np.ndarray, threads: int, fail_marker: str | None = None):
        self.evaluator = Evaluator(spec, inputs, threads)
        self.fail_marker = fail_marker

    def ready(self) -> Any:
        return self.evaluator.ready()

    def evaluate(self, batch: FaultBatch, index: np.ndarray | None) -> Evaluation:
        if self.fail_marker is not None and not os.path.exists(self.fail_marker):
            open(self.fail_marker, "w").close()
            os._exit(1)  # a lost worker, as when its node goes away
        return self.evaluator.evaluate(batch, index)


class RayPool:
    """``workers`` Ray actors used as one evaluator; requests go out in order and come back in order."""

    def __init__(
        self,
        spec: Instrumented,
        inputs: np.ndarray,
        limits: Limits,
        workers: int,
        address: str | None = None,
        fail_marker: str | None = None,
    ):
        self.ray = connect(address)
        actor = self.ray.remote(num_cpus=1, max_restarts=RETRIES, max_task_retries=RETRIES)(_Worker)
        # held for the pool's lifetime: a restarted actor is rebuilt from these objects
        self._arguments = (self.ray.put(spec), self.ray.put(inputs))
        self.actors = [actor.remote(*self._arguments, 1, fail_marker) for _ in range(workers)]
        runs = self._get([a.ready.remote() for a in self.actors], limits.timeout_s, "creating the sessions")
        self.clean_run = runs[0]
        if any(not np.array_equal(run.outputs, self.clean_run.outputs) for run in runs[1:]):
            raise InjectionRuntimeError("the Ray workers' onnxruntime sessions disagree on the clean outputs")
        self.timeout_s = limits.timeout_s

    def _get(self, refs: Any, timeout: float, what: str) -> Any:
        try:
            return self.ray.get(refs, timeout=timeout)
        except self.ray.exceptions.GetTimeoutError:
            raise InjectionRuntimeError(f"Ray workers did not finish {what} within {timeout:g} s") from None
        except self.ray.exceptions.RayError as exc:
            text = " ".join(str(exc).split())[:300]
            raise InjectionRuntimeError(f"Ray failed while {what} (after {RETRIES} retries): {text}") from None

    def evaluate(self, batch: FaultBatch, index: np.ndarray | None = None) -> Evaluation:
        """One request, on the first actor."""
        return self._get(self.actors[0].evaluate.remote(batch, index), self.timeout_s, "evaluating fault sets")

    def evaluate_parts(self, parts: Sequence[FaultBatch], index: np.ndarray | None) -> Iterator[Evaluation]:
        """Two requests in flight per actor; answers in request order."""
        index_ref = self.ray.put(index)
        pending: deque = deque()
        following = 0
        while following < len(parts) or pending:
            while following < len(parts) and len(pending) < 2 * len(self.actors):
                actor = self.actors[following % len(self.actors)]
                pending.append(actor.evaluate.remote(parts[following], index_ref))
                following += 1
            yield self._get(pending.popleft(), self.timeout_s, "evaluating fault sets")

    def close(self) -> None:
        """Release the actors (the Ray cluster itself stays up)."""
        for actor in self.actors:
            try:
                self.ray.kill(actor)
            except Exception:  # already gone
                pass
