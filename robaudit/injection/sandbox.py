"""onnxruntime, contained: the batched evaluator and the child process that hosts it.

A hostile or broken model can crash onnxruntime (a signal, not an exception) or
make it allocate without limit. :func:`open_evaluator` therefore runs the
:class:`Evaluator` — session creation included — in a fresh child interpreter
(``python -c``, so the caller's ``__main__`` is never re-imported as
multiprocessing's spawn/forkserver would), under an address-space limit
(``RLIMIT_AS``) and a per-request timeout. Only small messages cross the
pipe: the inputs once, then fault configurations in and errors out. A signal, a
timeout or an onnxruntime error becomes an :class:`InjectionRuntimeError` with a
one-line message. ``isolate=False`` runs the same evaluator in this process.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from robaudit.errors import InjectionRuntimeError
from robaudit.injection.instrument import CM_INPUT, FaultBatch, Instrumented

#: Largest constant onnxruntime may create by folding (bytes).
CONSTANT_FOLDING_CAP = 64 * 2**20
#: Rows (configuration × input pairs) per onnxruntime run, at most.
MAX_ROWS = 1024
#: Activation floats per run the evaluator aims at when it chooses the rows per run.
TARGET_RUN_FLOATS = 2**22


@dataclass(frozen=True)
class Limits:
    """Containment of the onnxruntime child process."""

    #: Address-space limit of the child in bytes (RLIMIT_AS); None: no limit.
    memory_bytes: int | None = None
    #: Seconds one request (session creation, one batch of configurations) may take.
    timeout_s: float = 600.0
    #: onnxruntime intra-op threads (0: onnxruntime's default).
    threads: int = 0


@dataclass(frozen=True)
class CleanRun:
    """What the evaluator reports once it is ready."""

    #: Clean outputs per input, flattened per sample, float64 [M, K].
    outputs: np.ndarray
    #: Whether configurations and inputs share onnxruntime runs (False: one row per run).
    batched: bool
    #: Rows per onnxruntime run.
    rows_per_run: int
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Evaluation:
    """Errors of C configurations on m inputs."""

    #: err = max_k |F̃_k(x) − F_k(x)| per configuration and input (docs/method.md §1.1), float64 [C, m].
    errors: np.ndarray
    #: Arg-max of the faulty output per configuration and input, int64 [C, m].
    argmax: np.ndarray


def default_memory_bytes() -> int | None:
    """The child's address-space limit: ``ROBAUDIT_INJECT_MEMORY_MB`` (0 disables), else the
    machine's physical memory, between 2 and 32 GiB."""
    text = os.environ.get("ROBAUDIT_INJECT_MEMORY_MB", "").strip()
    if text:
        try:
            megabytes = int(text)
        except ValueError:
            raise InjectionRuntimeError(f"ROBAUDIT_INJECT_MEMORY_MB must be an integer, got '{text}'") from None
        return None if megabytes <= 0 else megabytes * 2**20
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        physical = 32 * 2**30
    return int(min(max(physical, 2 * 2**30), 32 * 2**30))


# --------------------------------------------------------------------------- the evaluator


def _session(model: bytes, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # errors come back as exceptions; keep stderr clean
    if threads:
        options.intra_op_num_threads = threads
    try:
        options.add_session_config_entry(
            "optimization.constant_folding_max_output_size_in_bytes", str(CONSTANT_FOLDING_CAP)
        )
    except Exception:  # older onnxruntime: the cap is not available
        pass
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


class Evaluator:
    """Runs the instrumented suffix for many (fault configuration × input) pairs per run."""

    def __init__(self, spec: Instrumented, inputs: np.ndarray, threads: int = 0):
        self.spec = spec
        self.inputs = np.ascontiguousarray(inputs, dtype=np.dtype(spec.input_dtype))
        self.prefix = None if spec.prefix is None else _session(spec.prefix, threads)
        self.suffix = _session(spec.suffix, threads)
        self.outputs = [v for v in spec.frontier if v != spec.input_name]
        largest = max(int(np.prod(s)) if s else 1 for s in spec.frontier_shapes)
        self.rows = int(np.clip(TARGET_RUN_FLOATS // max(largest, 1), 8, MAX_ROWS))
        self.batched = not spec.one_sample and self._batching_works()
        if not self.batched:
            self.rows = 1
        self.frontier = self._frontier(self.inputs)
        self.clean = self._run_all(FaultBatch(1), np.arange(len(self.inputs)))[0]

    # ---- frontier and batching

    def _frontier(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Clean frontier values for every input, computed once."""
        step = self.rows if self.batched else 1
        parts: dict[str, list[np.ndarray]] = {v: [] for v in self.spec.frontier}
        for start in range(0, len(inputs), step):
            chunk = inputs[start : start + step]
            values = self._prefix_run(chunk)
            for name in self.spec.frontier:
                parts[name].append(values[name])
        return {name: np.concatenate(chunks) for name, chunks in parts.items()}

    def _prefix_run(self, chunk: np.ndarray) -> dict[str, np.ndarray]:
        values = {self.spec.input_name: chunk}
        if self.prefix is not None:
            values.update(zip(self.outputs, self.prefix.run(self.outputs, {self.spec.input_name: chunk}), strict=True))
        return values

    def _batching_works(self) -> bool:
        """Compare a batched run (2 configurations × up to 3 inputs) with one-row runs."""
        probe = self.inputs[:3]
        single = [self._suffix_out(self._prefix_run(probe[i : i + 1]), FaultBatch(1), 1, 1) for i in range(len(probe))]
        reference = np.concatenate(single, axis=1)
        try:
            batched = self._suffix_out(self._prefix_run(probe), FaultBatch(2), 2, len(probe))
        except Exception:  # onnxruntime refuses the batch (a hard-coded shape): loop instead
            return False
        scale = 1e-4 * (1.0 + np.abs(reference))
        return batched.shape == (2,) + reference.shape[1:] and bool(np.all(np.abs(batched - reference) <= scale))

    # ---- runs

    def _suffix_out(self, frontier: dict[str, np.ndarray], batch: FaultBatch, configs: int, inputs: int) -> np.ndarray:
        feeds = {f"ra_in/{name}": frontier[name] for name in self.spec.frontier}
        feeds[CM_INPUT] = np.array([configs, inputs], np.int64)
        feeds.update(self.spec.encode(batch))
        (out,) = self.suffix.run([self.spec.output_name], feeds)
        return np.asarray(out, np.float64).reshape(configs, inputs, -1)

    def _run_all(self, batch: FaultBatch, index: np.ndarray) -> np.ndarray:
        """Faulty outputs [C, m, K] in runs of at most ``rows`` rows."""
        m = len(index)
        per_inputs = min(m, self.rows)
        per_configs = max(1, self.rows // per_inputs)
        blocks = []
        for c0 in range(0, batch.count, per_configs):
            part = batch.take(slice(c0, c0 + per_configs))
            row = []
            for i0 in range(0, m, per_inputs):
                chosen = index[i0 : i0 + per_inputs]
                frontier = {name: _take(values, chosen) for name, values in self.frontier.items()}
                row.append(self._suffix_out(frontier, part, part.count, len(chosen)))
            blocks.append(np.concatenate(row, axis=1))
        return np.concatenate(blocks, axis=0)

    def evaluate(self, batch: FaultBatch, index: np.ndarray | None = None) -> Evaluation:
        """Errors and faulty arg-max of every configuration on the inputs ``index`` (default: all)."""
        index = np.arange(len(self.inputs)) if index is None else np.asarray(index, np.int64)
        out = self._run_all(batch, index)
        errors = np.abs(out - self.clean[index][None]).max(axis=-1)
        errors = np.where(np.isnan(errors), np.inf, errors)
        return Evaluation(errors, out.argmax(axis=-1))

    def evaluate_at(self, inputs: np.ndarray, batch: FaultBatch) -> Evaluation:
        """As :meth:`evaluate` on other ``inputs`` (the joint search's moved input), with the same
        sessions: their clean frontier and outputs are computed here, the campaign's stay as they are."""
        twin = copy.copy(self)
        twin.inputs = np.ascontiguousarray(inputs, dtype=np.dtype(self.spec.input_dtype))
        twin.frontier = twin._frontier(twin.inputs)
        twin.clean = twin._run_all(FaultBatch(1), np.arange(len(twin.inputs)))[0]
        return twin.evaluate(batch)

    def ready(self) -> CleanRun:
        """The clean outputs and how the runs are batched."""
        notes: tuple[str, ...] = ()
        if self.spec.one_sample:
            notes = ("dynamically quantized model: one sample per onnxruntime run (its quantization step is "
                     "computed over the whole tensor, so a batch would change each sample's rounding)",)
        elif not self.batched:
            notes = ("the model could not be batched (a batch-1 shape is hard-coded); one row per onnxruntime run, "
                     "slower (export with a symbolic batch: dynamic_axes, or dynamo's dynamic_shapes)",)
        return CleanRun(self.clean, self.batched, self.rows, notes)


class PlainSession:
    """One onnxruntime session of a whole model, answering ``run(names, feeds)``: the rewritten models
    of ``precision --check``, ``wait --check`` and ``harden``, with the session options of the campaigns."""

    def __init__(self, model: bytes, threads: int = 0):
        self.session = _session(model, threads)

    def ready(self) -> None:
        """Nothing to report once the session exists."""

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The values ``names`` on ``feeds``."""
        return [np.asarray(value) for value in self.session.run(names, feeds)]


def _take(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """values[index], without a copy when the index is a contiguous range."""
    if len(index) and index[-1] - index[0] == len(index) - 1 and np.all(np.diff(index) == 1):
        return values[index[0] : index[-1] + 1]
    return values[index]


# --------------------------------------------------------------------------- the child process


def _limit_memory(limit: int | None) -> None:
    if limit is None:
        return
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    value = min(v for v in (limit, soft, hard) if v != resource.RLIM_INFINITY)  # never raise an inherited limit
    resource.setrlimit(resource.RLIMIT_AS, (value, value))


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, MemoryError):
        text = "out of memory (the child's address-space limit was reached)"
    return text[:400]


#: What a parent may ask of the object its child serves.
_REQUESTS = frozenset({"evaluate", "evaluate_at", "run"})


def _serve(conn) -> None:
    """Child process main loop: build the served object (an :class:`Evaluator` or a :class:`PlainSession`)
    from the first message ``(class, arguments, limits)``, then answer requests until told to stop."""
    try:
        factory, args, limits = conn.recv()
        _limit_memory(limits.memory_bytes)
        served = factory(*args)
        answer = ("ok", served.ready())
    except BaseException as exc:
        _reply(conn, ("error", _describe(exc)))
        return
    if not _reply(conn, answer):
        return
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] == "stop":
            return
        if message[0] == "abort":  # test hook: behave like a crashing onnxruntime
            os.abort()
        try:
            if message[0] not in _REQUESTS:
                raise ValueError(f"unknown request {message[0]!r}")
            answer = ("ok", getattr(served, message[0])(*message[1:]))
        except BaseException as exc:
            answer = ("error", _describe(exc))
        if not _reply(conn, answer):
            return


def _reply(conn, message: tuple) -> bool:
    """Send ``message`` to the parent; False when the parent is gone (it stopped or was interrupted, and
    reads nothing more: the child ends quietly instead of printing a broken pipe)."""
    try:
        conn.send(message)
    except OSError:  # BrokenPipeError, or the descriptor already closed
        return False
    return True


def child_main(read_fd: int, write_fd: int) -> None:
    """Entry point of the child process (``python -c``), talking over two pipe descriptors."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = _Duplex(Connection(read_fd, writable=False), Connection(write_fd, readable=False))
    _serve(conn)


class _Duplex:
    """Two one-way connections as one (a plain pipe pair works on every POSIX system)."""

    def __init__(self, reader: Connection, writer: Connection):
        self.reader, self.writer = reader, writer

    def send(self, message) -> None:
        self.writer.send(message)

    def recv(self):
        return self.reader.recv()

    def poll(self, timeout: float) -> bool:
        return self.reader.poll(timeout)

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


class _Contained:
    """An object served by a child process under :class:`Limits` (:func:`_serve`): a native crash, a
    runaway allocation or a hang of onnxruntime there becomes one :class:`InjectionRuntimeError` here."""

    def __init__(self, factory: type, args: tuple, limits: Limits):
        self.limits = limits
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        code = f"from robaudit.injection.sandbox import child_main; child_main({to_child_r}, {from_child_w})"
        try:
            # its own session: a terminal's Ctrl-C goes to the parent's process group only, so it cannot
            # interrupt the child while Python starts (a traceback under the report); the parent stops it
            self._process = subprocess.Popen(
                [sys.executable, "-c", code], pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self._conn = _Duplex(Connection(from_child_r, writable=False), Connection(to_child_w, readable=False))
        self._send((factory, args, limits), "creating the onnxruntime session")

    def _answer(self, what: str):
        if not self._conn.poll(self.limits.timeout_s):
            self._kill()
            raise InjectionRuntimeError(
                f"onnxruntime did not finish {what} within {self.limits.timeout_s:g} s (raise --timeout)"
            )
        try:
            status, payload = self._conn.recv()
        except (EOFError, OSError):
            raise InjectionRuntimeError(f"onnxruntime crashed ({self._death()}) while {what}") from None
        if status == "error":
            limit = self.limits.memory_bytes
            memory = any(word in payload.lower() for word in ("memory", "alloc", "map segment"))
            hint = f" (memory limit {limit / 2**30:g} GiB; see ROBAUDIT_INJECT_MEMORY_MB)" if memory and limit else ""
            raise InjectionRuntimeError(f"onnxruntime failed while {what}{hint}: {payload}")
        return payload

    def _death(self) -> str:
        try:
            code = self._process.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        if code is None:
            self._kill()
            return "no answer"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            limit = self.limits.memory_bytes
            hint = "" if limit is None else f"; memory limit {limit / 2**30:g} GiB"
            return f"killed by {name}{hint}"
        return f"exit code {code}"

    def _kill(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
        try:
            self._process.wait(5)
        except subprocess.TimeoutExpired:  # pragma: no cover - a process that ignores SIGKILL
            pass

    def _send(self, message: tuple, what: str) -> None:
        try:
            self._conn.send(message)
        except (BrokenPipeError, OSError):
            raise InjectionRuntimeError(f"onnxruntime crashed ({self._death()}) while {what}") from None

    def _request(self, message: tuple, what: str):
        self._send(message, what)
        return self._answer(what)

    def abort_for_test(self) -> None:
        """Make the child die the way a crashing onnxruntime does (tests only)."""
        self._request(("abort",), "running the instrumented model")

    def close(self) -> None:
        """Stop the child process."""
        if self._process.poll() is None:
            try:
                self._conn.send(("stop",))
                self._process.wait(5)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                pass
        self._kill()
        self._conn.close()


class IsolatedEvaluator(_Contained):
    """The :class:`Evaluator` in a child process under :class:`Limits`."""

    def __init__(self, spec: Instrumented, inputs: np.ndarray, limits: Limits, wait: bool = True):
        super().__init__(Evaluator, (spec, inputs, limits.threads), limits)
        self.clean_run: CleanRun = CleanRun(np.zeros((0, 0)), True, 1)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> CleanRun:
        """Wait for the child's session (``wait=False`` lets several children start at once)."""
        self.clean_run = self._answer("creating the onnxruntime session")
        return self.clean_run

    def evaluate(self, batch: FaultBatch, index: np.ndarray | None = None) -> Evaluation:
        """As :meth:`Evaluator.evaluate`, in the child."""
        return self._request(("evaluate", batch, index), "running the instrumented model")

    def evaluate_at(self, inputs: np.ndarray, batch: FaultBatch) -> Evaluation:
        """As :meth:`Evaluator.evaluate_at`, in the child."""
        return self._request(("evaluate_at", inputs, batch), "running the instrumented model")

    def submit(self, batch: FaultBatch, index: np.ndarray | None = None) -> None:
        """Start :meth:`evaluate` in the child without waiting; :meth:`collect` gets the answer."""
        self._send(("evaluate", batch, index), "running the instrumented model")

    def collect(self) -> Evaluation:
        """The answer to the oldest :meth:`submit`."""
        return self._answer("running the instrumented model")



class IsolatedSession(_Contained):
    """A :class:`PlainSession` in a child process under :class:`Limits`."""

    def __init__(self, model: bytes, limits: Limits):
        super().__init__(PlainSession, (model, limits.threads), limits)
        self._answer("creating the onnxruntime session")

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """As :meth:`PlainSession.run`, in the child."""
        return self._request(("run", names, feeds), "running the model")


def _here(what: str, call: Callable[..., Any], *args: Any) -> Any:
    """``call(*args)`` in this process, an onnxruntime failure as the one error a child would give."""
    try:
        return call(*args)
    except Exception as exc:
        raise InjectionRuntimeError(f"onnxruntime failed while {what}: {_describe(exc)}") from None


class LocalSession:
    """A :class:`PlainSession` in this process (no containment; ``isolate=False``)."""

    def __init__(self, model: bytes, limits: Limits):
        self._session = _here("creating the session", PlainSession, model, limits.threads)

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """As :meth:`PlainSession.run`."""
        return _here("running the model", self._session.run, names, feeds)

    def close(self) -> None:
        """Nothing to release."""


def open_session(model: bytes, limits: Limits | None = None, isolate: bool = True) -> IsolatedSession | LocalSession:
    """An onnxruntime session of ``model`` (serialized ONNX): in a contained child process (limits: by
    default :func:`default_memory_bytes`), or here. Close it when done."""
    limits = Limits(memory_bytes=default_memory_bytes()) if limits is None else limits
    return (IsolatedSession if isolate else LocalSession)(model, limits)


class LocalEvaluator:
    """The :class:`Evaluator` in this process (no containment; for tests and benchmarks)."""

    def __init__(self, spec: Instrumented, inputs: np.ndarray, limits: Limits):
        self._evaluator = _here("creating the session", Evaluator, spec, inputs, limits.threads)
        self.clean_run = self._evaluator.ready()

    def evaluate(self, batch: FaultBatch, index: np.ndarray | None = None) -> Evaluation:
        """As :meth:`Evaluator.evaluate`."""
        return _here("running the instrumented model", self._evaluator.evaluate, batch, index)

    def evaluate_at(self, inputs: np.ndarray, batch: FaultBatch) -> Evaluation:
        """As :meth:`Evaluator.evaluate_at`."""
        return _here("running the instrumented model", self._evaluator.evaluate_at, inputs, batch)

    def close(self) -> None:
        """Nothing to release."""


def open_evaluator(spec: Instrumented, inputs: np.ndarray, limits: Limits = Limits(), isolate: bool = True):
    """An evaluator for ``spec`` on ``inputs``: in a contained child process, or here."""
    cls = IsolatedEvaluator if isolate else LocalEvaluator
    return cls(spec, inputs, limits)
