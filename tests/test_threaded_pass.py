"""The tight pass with its chunks of outputs back-propagated in several threads (docs/method.md §4.4).

* On an image model taken in tiles (rectangles, a residual Add), a U-Net-like one (MaxPool,
  ConvTranspose, Concat) and a dense chain, the kept values, totals, per-neuron maxima, cut costs
  and synapse terms of a pass in 2–4 threads equal, bit for bit, those of one thread cutting the
  outputs into the same chunks, and equal P built by hand from dense matrices
  (``test_windowed_pass._reference_sensitivities``); the pass really ran in several threads.
* Weakened copies are caught: a pool that drops the last chunk, and a per-neuron merge that
  keeps the last chunk's maxima instead of the largest.
* An error in one chunk is raised by the pass (one thread or several).
* ``ROBAUDIT_THREADS`` is read when used (default: the usable cores, at most 8); each thread's
  chunk gets its share of ``ROBAUDIT_TIGHT_MEMORY_MB``; a value that is not an integer ≥ 1 is one
  line, exit 2; ``check``/``certify`` worker processes share the cores between them.
* On a model with rounding, the pass run again for more kept values cuts the outputs into the same
  chunks as the first (a copy whose second run drops the rounding visitor, and so takes tiles, is
  caught); a bound and its context pickle and deep-copy (their locks made again).
* Progress: one report per chunk, in order, to the reporter of the current context only; ``bound``
  shows it on a terminal's stderr and prints the same report as without one.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import pty
import subprocess
import sys
import threading

import numpy as np
import pytest
from conftest import SAMPLES, dense_chain, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from test_graph_ops import GraphBuilder
from test_windowed_pass import _check_against_reference, _image_net, _reference_sensitivities, _unet_like

import robaudit.bounds.tight as tight_module
from robaudit import limits
from robaudit.bounds.audit import load_network
from robaudit.bounds.fep import Analysis, FailureModel
from robaudit.bounds.progress import SENSITIVITIES, reporting
from robaudit.bounds.tight import TightBound, each_chunk, output_chunks
from robaudit.errors import OptionError
from robaudit.graph.network import NetworkOptions
from robaudit.injection.workers import map_in_processes, threads_per_worker


def _analysis(path, failure: FailureModel, synapses: int = 0) -> Analysis:
    _, network = load_network(path, NetworkOptions())
    hidden = len(Analysis(network, failure).hidden)
    return Analysis(network, failure, [synapses] * hidden if synapses else None)


def _bound(
    analysis: Analysis, threads: int, chunk_memory: int, monkeypatch, serial: bool = False
) -> tuple[TightBound, set[int]]:
    """The tight bound with ``ROBAUDIT_THREADS`` = ``threads``, each chunk given ``chunk_memory`` bytes, and
    the threads its reduction ran in; ``serial``: the same chunks, run one after the other in this thread."""
    monkeypatch.setenv("ROBAUDIT_THREADS", str(threads))
    real_each = tight_module.each_chunk
    if serial:
        monkeypatch.setattr(tight_module, "each_chunk", lambda work, chunks, _: real_each(work, chunks, 1))
    seen: set[int] = set()
    real_keep = TightBound._keep

    def keep(self, *args, **kwargs):
        seen.add(threading.get_ident())
        return real_keep(self, *args, **kwargs)

    monkeypatch.setattr(TightBound, "_keep", keep)
    bound = TightBound(analysis, memory_bytes=chunk_memory * threads)
    monkeypatch.setattr(TightBound, "_keep", real_keep)
    monkeypatch.setattr(tight_module, "each_chunk", real_each)
    return bound, seen


def _same_numbers(one: TightBound, many: TightBound) -> bool:
    """Bit for bit the same reductions (the kept values as far as both kept them: the budget for them
    grows with the memory given)."""
    for i in range(len(one.total)):
        width = min(one.top[i].shape[1], many.top[i].shape[1])
        pairs = [(one.top[i][:, :width], many.top[i][:, :width]), (one.total[i], many.total[i]),
                 (one.neuron_max[i], many.neuron_max[i]), (one.synapse_terms[i], many.synapse_terms[i])]
        if one.cut_widths is not None:
            pairs.append((one.cut_cost[i], many.cut_cost[i]))
        if not all(np.array_equal(a, b) for a, b in pairs):
            return False
    return True


def _chunks(analysis: Analysis, chunk_memory: int, threads: int = 1) -> list:
    net = analysis.network
    rows = tight_module.chunk_rows(analysis, chunk_memory)
    return output_chunks(net.clean[net.tail_start].shape, rows, tiles=True, threads=threads)


@pytest.mark.parametrize("threads", [2, 4])
@pytest.mark.parametrize("mode", ["crash", "byzantine"])
def test_threads_give_the_numbers_of_one_thread_on_an_image_model(tmp_path, threads, mode, monkeypatch):
    failure = FailureModel.crash() if mode == "crash" else FailureModel.byzantine(1.0)
    analysis = _analysis(_image_net(tmp_path), failure)
    assert len(_chunks(analysis, 20_000)) > threads  # several tiles per thread
    one, _ = _bound(analysis, threads, 20_000, monkeypatch, serial=True)
    many, seen = _bound(analysis, threads, 20_000, monkeypatch)
    assert len(seen) > 1  # the chunks ran in several threads
    assert _same_numbers(one, many)
    _check_against_reference(many, _reference_sensitivities(analysis))


def test_threads_give_the_numbers_of_one_thread_on_a_unet(tmp_path, monkeypatch):
    analysis = _analysis(_unet_like(tmp_path), FailureModel.byzantine(0.5))
    assert len(_chunks(analysis, 600_000)) > 2
    one, _ = _bound(analysis, 3, 600_000, monkeypatch, serial=True)
    many, seen = _bound(analysis, 3, 600_000, monkeypatch)
    assert len(seen) > 1 and _same_numbers(one, many)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), threads=st.integers(2, 4), rows=st.integers(1, 3))
def test_threads_give_the_numbers_of_one_thread_on_dense_chains(tmp_path_factory, seed, threads, rows):
    """Random dense chains with synapse failures, chunks of 1–3 outputs (a per-test monkeypatch cannot be
    used under hypothesis: the variable is set and restored here)."""
    path = dense_chain([5, 8, 6, 7], ["relu", "tanh"], seed=seed, weight_scale=1.5).save(tmp_path_factory.mktemp("c"))
    analysis = _analysis(path, FailureModel.byzantine(2.0), synapses=2)
    chunk_memory = rows * 8 * (6 * 8 + 3 * 8) * 4  # chunk_rows: a quarter of it, per_row bytes a row
    with pytest.MonkeyPatch.context() as patch:
        one, _ = _bound(analysis, threads, chunk_memory, patch, serial=True)
        many, seen = _bound(analysis, threads, chunk_memory, patch)
    count = len(_chunks(analysis, chunk_memory, threads))
    needed = -(-7 // rows)  # runs of at most ``rows`` outputs
    assert count == (1 if needed == 1 else min(7, -(-needed // threads) * threads))
    assert _same_numbers(one, many)


def test_a_pool_that_drops_a_chunk_is_caught(tmp_path, monkeypatch):
    analysis = _analysis(_image_net(tmp_path), FailureModel.crash())
    one, _ = _bound(analysis, 2, 20_000, monkeypatch, serial=True)
    dropped = lambda work, chunks, threads: each_chunk(work, chunks[:-1], threads)  # noqa: E731
    monkeypatch.setattr(tight_module, "each_chunk", dropped)
    many, _ = _bound(analysis, 2, 20_000, monkeypatch)
    assert not _same_numbers(one, many)


def test_a_merge_keeping_the_last_chunks_maxima_is_caught(tmp_path, monkeypatch):
    """Weakened: each chunk's per-neuron maxima overwrite those merged before (what a lost update between
    two threads would leave)."""
    analysis = _analysis(_image_net(tmp_path), FailureModel.crash())
    one, _ = _bound(analysis, 2, 20_000, monkeypatch, serial=True)

    def overwrite(self, i, columns, largest):
        if isinstance(columns, tight_module.Rectangle):
            view = columns.view(self.neuron_max[i])
            view[...] = largest.reshape(view.shape)
        else:
            self.neuron_max[i][slice(None) if columns is None else columns] = largest

    monkeypatch.setattr(TightBound, "_merge_neuron_max", overwrite)
    many, _ = _bound(analysis, 2, 20_000, monkeypatch)
    assert not all(np.array_equal(a, b) for a, b in zip(one.neuron_max, many.neuron_max, strict=True))


@pytest.mark.parametrize("threads", [1, 3])
def test_an_error_in_a_chunk_is_raised(threads):
    done: list[int] = []

    def work(rows):
        if rows.start == 4:
            raise ValueError("chunk 4")
        done.append(rows.start)

    with pytest.raises(ValueError, match="chunk 4"):
        each_chunk(work, [slice(i, i + 1) for i in range(8)], threads)
    assert 0 in done and 4 not in done


def test_each_thread_gets_its_share_of_the_memory(tmp_path, monkeypatch):
    analysis = _analysis(_image_net(tmp_path), FailureModel.crash())
    asked: list[int] = []
    real = tight_module.chunk_rows
    monkeypatch.setattr(tight_module, "chunk_rows", lambda a, memory: asked.append(memory) or real(a, memory))
    monkeypatch.setenv("ROBAUDIT_THREADS", "4")
    TightBound(analysis, memory_bytes=80_000)
    assert asked and set(asked) == {20_000}


def test_the_thread_count_is_read_when_used(monkeypatch):
    monkeypatch.delenv("ROBAUDIT_THREADS", raising=False)
    assert limits.bound_threads() == min(limits.DEFAULT_MAX_THREADS, limits.usable_cores())
    monkeypatch.setenv("ROBAUDIT_THREADS", "3")
    assert limits.bound_threads() == 3
    for bad in ("0", "-2", "many", "1.5"):
        monkeypatch.setenv("ROBAUDIT_THREADS", bad)
        with pytest.raises(OptionError, match="ROBAUDIT_THREADS"):
            limits.bound_threads()


def test_a_bad_thread_count_is_one_line_exit_2():
    proc = run_cli("bound", SAMPLES / "digits_mlp.onnx", expect=None, env={"ROBAUDIT_THREADS": "0"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "ROBAUDIT_THREADS" in proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr


def test_worker_processes_share_the_cores(monkeypatch):
    """``check``/``certify`` workers: each process's tight pass gets cores // workers threads (at least 1),
    unless the user set ``ROBAUDIT_THREADS``."""
    monkeypatch.delenv("ROBAUDIT_THREADS", raising=False)
    names = ["ROBAUDIT_THREADS"] * 2
    assert map_in_processes(os.getenv, names, 2) == [str(threads_per_worker(2))] * 2
    monkeypatch.setenv("ROBAUDIT_THREADS", "5")
    assert map_in_processes(os.getenv, names, 2) == ["5", "5"]


def _image_with_rounding(tmp_path):
    """x [1, 9, 9] → c1 ReLU → QuantizeLinear/DequantizeLinear (a rounding value) → c2 (grouped) ReLU → + → c3:
    an image output, so that the pass would take tiles but for its rounding visitor."""
    b = GraphBuilder(4, [1, 9, 9])
    h = b.op("Relu", [b.conv("x", 1, 2, name="c1")])
    scale = b.const(0.05)
    b.inits.append(numpy_helper.from_array(np.array(0, np.int8), "zq"))
    rounded = b.op("DequantizeLinear", [b.op("QuantizeLinear", [h, scale, "zq"]), scale, "zq"])
    h2 = b.op("Relu", [b.conv(rounded, 2, 2, group=2, name="c2")])
    path = tmp_path / "rounded.onnx"
    path.write_bytes(b.model(b.conv(b.op("Add", [h2, rounded]), 2, 2, name="c3")).SerializeToString())
    return path


def _chunk_lists(analysis: Analysis, monkeypatch) -> list[list]:
    """The chunks of each run of the pass when the first one keeps one value per row and the bound is then
    asked for all of them (:meth:`TightBound._widen` runs the pass again)."""
    runs: list[list] = []
    real = tight_module.each_chunk
    monkeypatch.setattr(tight_module, "each_chunk", lambda work, chunks, threads: runs.append(chunks) or real(
        work, chunks, threads))
    monkeypatch.setenv("ROBAUDIT_THREADS", "2")
    bound = TightBound(analysis, memory_bytes=4_000_000, first_kept=1)  # room to keep every value
    _ = bound.top
    return runs


def _same_chunks(runs: list[list]) -> bool:
    first, second = runs
    return len(first) == len(second) and all(
        np.array_equal(np.arange(a.start, a.stop) if isinstance(a, slice) else a,
                       np.arange(b.start, b.stop) if isinstance(b, slice) else b)
        for a, b in zip(first, second, strict=True))


def test_the_second_pass_cuts_the_outputs_as_the_first(tmp_path, monkeypatch):
    """On a model with rounding the first pass has a value visitor (no tiles); the pass run again for more
    kept values must have it too, so that it cuts the same chunks and writes the same totals back."""
    analysis = _analysis(_image_with_rounding(tmp_path), FailureModel.byzantine(1.0))
    assert analysis.network.rounding
    runs = _chunk_lists(analysis, monkeypatch)
    assert len(runs) == 2 and len(runs[0]) > 1 and _same_chunks(runs)


def test_a_second_pass_without_the_rounding_visitor_is_caught(tmp_path, monkeypatch):
    analysis = _analysis(_image_with_rounding(tmp_path), FailureModel.byzantine(1.0))
    real_pass = tight_module.SensitivityPass
    calls: list[int] = []

    def first_only(analysis, visit, use_ranges=True, memory_bytes=None, visit_value=None, **kwargs):
        calls.append(1)
        return real_pass(analysis, visit, use_ranges, memory_bytes, visit_value if len(calls) == 1 else None, **kwargs)

    monkeypatch.setattr(tight_module, "SensitivityPass", first_only)
    assert not _same_chunks(_chunk_lists(analysis, monkeypatch))


def test_a_bound_pickles_and_copies(tmp_path, monkeypatch):
    """The per-thread buffers and locks are not pickled: made again on load, the bound (and its context)
    answers as before and can run its pass again."""
    analysis = _analysis(_image_net(tmp_path), FailureModel.crash())
    bound = TightBound(analysis, memory_bytes=4_000_000, first_kept=1)
    for copied in (pickle.loads(pickle.dumps(bound)), copy.deepcopy(bound)):
        assert copied.fep([1, 1]) == bound.fep([1, 1])
        assert _same_numbers(bound, copied)  # the copy runs its pass again for all kept values (_widen)
    ctx = pickle.loads(pickle.dumps(analysis.context(True)))
    assert ctx.memo(("k",), lambda: 7) == 7


@pytest.mark.parametrize("threads", [1, 3])
def test_progress_counts_the_chunks_in_order(tmp_path, threads, monkeypatch):
    analysis = _analysis(_image_net(tmp_path), FailureModel.crash())
    chunks = len(_chunks(analysis, 20_000))
    seen: list[tuple[str, int, int]] = []
    monkeypatch.setenv("ROBAUDIT_THREADS", str(threads))
    with reporting(lambda phase, done, total: seen.append((phase, done, total))):
        TightBound(analysis, memory_bytes=20_000 * threads)
    assert seen == [(SENSITIVITIES, done, chunks) for done in range(1, chunks + 1)]
    TightBound(analysis, memory_bytes=20_000 * threads)  # outside the block: nothing more reported
    assert len(seen) == chunks


def _on_a_terminal(command: list[str], env: dict) -> tuple[subprocess.CompletedProcess, bytes]:
    """``command`` run with stderr a terminal: (the process, stdout captured), what the terminal showed."""
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=follower, env=env, timeout=120)
        os.close(follower)
        shown = b""
        while True:
            try:
                block = os.read(leader, 65536)
            except OSError:  # the terminal closed
                break
            if not block:
                break
            shown += block
    finally:
        os.close(leader)
    return proc, shown


def test_bound_shows_the_progress_on_a_terminal_only(tmp_path):
    """stderr a terminal: the bar names the pass (not with -q, as inject and certify); stdout (the report) is the
    same as without a terminal."""
    path = _image_net(tmp_path)
    env = {**os.environ, "ROBAUDIT_TIGHT_MEMORY_MB": "1", "COLUMNS": "120", "TERM": "xterm"}  # CI may say dumb
    command = [sys.executable, "-m", "robaudit", "bound", str(path), "-f", "json"]
    plain = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert plain.returncode == 0 and "tight sensitivities" not in plain.stderr
    proc, shown = _on_a_terminal(command, env)
    assert proc.returncode == 0
    assert b"tight sensitivities" in shown
    assert json.loads(proc.stdout) == json.loads(plain.stdout)
    quiet, shown = _on_a_terminal([*command, "-q"], env)
    assert quiet.returncode == 0 and shown == b"" and json.loads(quiet.stdout) == json.loads(plain.stdout)


def _balanced(cut, outputs: int, rows: int, threads: int) -> bool:
    """Whether ``cut`` (as :func:`output_chunks`) gives consecutive runs holding every output once, in order,
    none longer than the memory allows, sizes within one of each other, as few as the memory allows rounded
    up to a multiple of the threads (at most one run per output)."""
    chunks = cut((1, outputs), rows, threads=threads)
    sizes = [c.stop - c.start for c in chunks]
    needed = -(-outputs // rows)
    expected = needed if needed <= 1 or threads == 1 else min(outputs, -(-needed // threads) * threads)
    return ([i for c in chunks for i in range(c.start, c.stop)] == list(range(outputs))
            and all(0 < size <= rows for size in sizes) and (not sizes or max(sizes) - min(sizes) <= 1)
            and len(chunks) == expected)


@settings(max_examples=200, deadline=None)
@given(outputs=st.integers(0, 3000), rows=st.integers(1, 4000), threads=st.integers(1, 9))
def test_runs_of_outputs_are_balanced_between_the_threads(outputs, rows, threads):
    assert _balanced(output_chunks, outputs, rows, threads)


def test_runs_left_as_the_memory_cuts_them_are_caught():
    """Weakened: runs of ``step_rows`` and a short last one (the cut before threads): caught."""
    def plain(shape, step_rows, tiles=False, threads=1):
        outputs = int(np.prod(shape))
        return [slice(s, min(outputs, s + step_rows)) for s in range(0, outputs, step_rows)]

    assert not _balanced(plain, 1000, 202, 2) and not _balanced(plain, 1000, 37, 2)
    assert _balanced(plain, 1000, 250, 1)  # one thread, runs that divide evenly: the same cut
