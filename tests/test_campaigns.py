"""Campaigns past one process: --workers, --shard + merge, statistical sizing, check --workers.

Every split must give the single run's report bit for bit: the comparisons below are exact
(JSON text of the whole report), never approximate.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import multiprocessing
import os
import signal
import threading
import time

import numpy as np
import pytest
from conftest import SAMPLES, cli_json, describe, run_in_process

from robaudit.bounds.audit import load_network, model_info
from robaudit.errors import InjectionRuntimeError, OptionError
from robaudit.formats.report import report_dict
from robaudit.formats.serial import to_json
from robaudit.graph.network import NetworkOptions
from robaudit.injection.campaign import failure_vector, run_injection
from robaudit.injection.instrument import FaultBatch
from robaudit.injection.results import InjectOptions
from robaudit.injection.sandbox import Evaluation
from robaudit.injection.shards import ShardError, merge_reports
from robaudit.injection.statistics import sample_size, wilson_interval
from robaudit.injection.workers import Runner, evaluate_parts, map_in_processes, parse_shard, split_evenly

LENET = SAMPLES / "lenet.onnx"


@pytest.fixture(autouse=True)
def _no_domain_certificate(monkeypatch):
    """These tests compare reports of one campaign run whole and split, bit for bit; the bound beside them is the
    same either way, so the certificate of the whole domain (≈1 s per LeNet report) is left out."""
    monkeypatch.setenv("ROBAUDIT_DOMAIN_CERTIFICATE_BUDGET", "0")


@pytest.fixture(scope="module")
def lenet():
    loaded, network = load_network(LENET, NetworkOptions())
    return network, model_info(loaded)


def _report(lenet, runner: Runner = Runner(), **kwargs) -> dict:
    network, info = lenet
    counts = kwargs.pop("counts", (2,))
    options = InjectOptions(vectors=(failure_vector(network, counts),), samples=8, runner=runner, **kwargs)
    return json.loads(to_json(report_dict(run_injection(network, options, info))))


# --------------------------------------------------------------------------- --workers


@pytest.mark.parametrize("search, trials", [("random", 400), ("worst", 40)])
def test_workers_give_the_single_process_report(lenet, search, trials):
    single = _report(lenet, Runner(1), search=search, trials=trials, seed=3)
    pooled = _report(lenet, Runner(2), search=search, trials=trials, seed=3)
    assert pooled == single
    assert single["vectors"][0]["configurations"] >= trials


def test_thread_count_does_not_change_a_bit(lenet):
    assert _report(lenet, Runner(1, cores=1), trials=120) == _report(lenet, Runner(1), trials=120)


def test_split_evenly_and_map_in_processes():
    assert [list(r) for r in split_evenly(7, 3)] == [[0, 1], [2, 3], [4, 5, 6]]
    assert sum(len(r) for r in split_evenly(10, 4)) == 10
    assert map_in_processes(math.factorial, list(range(7)), 2) == [math.factorial(i) for i in range(7)]


class _Truncating:
    """An evaluator that loses the last fault set of every request (a worker dropping work)."""

    def evaluate(self, batch: FaultBatch, index=None) -> Evaluation:
        rows = max(0, batch.count - 1)
        return Evaluation(np.zeros((rows, 2)), np.zeros((rows, 2), np.int64))


def test_fewer_sets_than_sent_is_an_error():
    with pytest.raises(InjectionRuntimeError, match="returned 2 of the 3 fault sets"):
        list(evaluate_parts(_Truncating(), [FaultBatch(3)], None))


# --------------------------------------------------------------------------- --shard and merge


def test_shards_merge_into_the_single_run_report(lenet):
    single = _report(lenet, trials=400, seed=5)
    shards = [(f"s{i}", _report(lenet, Runner(shard=(i, 3)), trials=400, seed=5)) for i in (2, 0, 1)]
    starts = sorted(r["vectors"][0]["shard"]["sets"][0] for _, r in shards)
    assert starts[0] == 0 and len(set(starts)) == 3  # three non-empty slices
    assert merge_reports(shards) == single
    assert merge_reports([("s1", _report(lenet, Runner(shard=(0, 1)), trials=400, seed=5))]) == single


@pytest.mark.parametrize("scaled", [10, 20])
def test_merged_outside_only_is_the_single_runs(lenet, scaled):
    """Inputs 0..255 (the first ``scaled`` of 20; the rest inside [0, 1]): the errors above the bound lie on inputs
    outside the domain; the merged report says so (outside_only) exactly as the single run does."""
    x = np.load(SAMPLES / "lenet_inputs.npz")["x"][:20].astype(np.float32)
    x[:scaled] *= 255.0
    single = _report(lenet, trials=60, seed=1, inputs=x, counts=(1,))
    assert single["violation"] and single["outside_only"]
    shards = [(f"s{i}", _report(lenet, Runner(shard=(i, 2)), trials=60, seed=1, inputs=x, counts=(1,)))
              for i in range(2)]
    assert merge_reports(shards) == single


def test_merged_bracket_is_the_whole_campaigns_not_the_first_shards(lenet):
    """The largest error lies in shard 2: the merged bracket was shard 0's maximum, in any order."""
    single = _report(lenet, trials=300, seed=2)
    shards = [(f"s{i}", _report(lenet, Runner(shard=(i, 3)), trials=300, seed=2)) for i in range(3)]
    maxima = [report["measured"]["max"] for _, report in shards]  # each shard's own run
    assert maxima[0] < maxima[1] < maxima[2]
    for order in ((0, 1, 2), (2, 0, 1)):
        merged = merge_reports([shards[i] for i in order])
        assert merged["bracket"] == {"best_found": maxima[2], "bound": single["bound"]}
        assert merged["vectors"][0]["bracket"]["best_found"] == maxima[2]
        assert merged == single


def test_merge_refuses_incomplete_or_mixed_shards(lenet):
    a = _report(lenet, Runner(shard=(0, 2)), trials=200, seed=1)
    b = _report(lenet, Runner(shard=(1, 2)), trials=200, seed=1)
    other_seed = _report(lenet, Runner(shard=(1, 2)), trials=200, seed=2)
    cases = [
        ([("a", a)], "shard 1/2 missing"),
        ([("a", a), ("a2", a), ("b", b)], "shard 0/2 is given twice"),
        ([("a", a), ("c", other_seed)], "'c' comes from another search, number of fault sets or seed"),
        ([("a", a), ("s", _report(lenet, trials=200, seed=1))], "'s' is not a shard report"),
    ]
    bad_model = json.loads(json.dumps(b))
    bad_model["model"]["sha256"] = "0" * 64
    cases.append(([("a", a), ("m", bad_model)], "'m' comes from another model"))
    for reports, message in cases:
        with pytest.raises(ShardError, match=message):
            merge_reports(reports)


def test_shard_cli_and_merge_exit_codes(tmp_path):
    args = ["inject", LENET, "--crash", "1", "--samples", "8", "--trials", "300", "--seed", "4", "-q"]
    run_in_process(*args, "-o", tmp_path / "single.json")
    for i in range(2):
        run_in_process(*args, "--shard", f"{i}/2", "-o", tmp_path / f"s{i}.json")
    merged = cli_json("merge", tmp_path / "s1.json", tmp_path / "s0.json")
    assert merged == json.loads((tmp_path / "single.json").read_text())
    for command, message in [
        (["merge", tmp_path / "s0.json"], "shard 1/2 missing"),
        (["merge", tmp_path / "s0.json", tmp_path / "s0.json", tmp_path / "s1.json"], "given twice"),
        ([*args, "--shard", "2/2"], "--shard takes I/N with 0 ≤ I < N"),
        ([*args, "--shard", "x"], "--shard takes I/N"),
        ([*args, "--workers", "0"], "--workers must be at least 1"),
        ([*args, "--search", "worst", "--shard", "0/2"], "--shard applies to the random search only"),  # no --margin
        ([*args, "--margin", "0.1"], "drop --trials"),
    ]:
        proc = run_in_process(*command, expect=2)
        assert message in proc.stderr, describe(proc)
        assert proc.stderr.startswith("robaudit: ") and proc.stderr.count("\n") == 1, describe(proc)


def test_parse_shard():
    assert parse_shard("3/4") == (3, 4) and parse_shard(None) is None
    for bad in ("4/4", "-1/4", "1/0", "1", "a/b"):
        with pytest.raises(OptionError):
            parse_shard(bad)


# --------------------------------------------------------------------------- statistical sizing


def test_margin_sizes_the_campaign_from_the_exact_population(lenet):
    network, _ = lenet
    report = _report(lenet, counts=(1,), margin=0.1, confidence=0.9)
    population = math.prod(layer.neurons for layer in network.hidden_layers)  # C(N_l, 1) per layer
    sizing = report["search"]["sizing"]
    assert sizing["populations"] == [str(population)]
    assert sizing["trials"] == sample_size(population, 0.1, 0.9) == report["vectors"][0]["configurations"]
    assert sizing["trials"] == math.ceil(1.644854**2 * 0.25 / 0.01 - 1e-9)  # population ≫ n: ≈ t²/4e²


def test_failure_rate_counts_sets_above_epsilon(lenet):
    """The rate against the per-set errors recorded in a one-shard report, at three ε."""
    raw = _report(lenet, Runner(shard=(0, 1)), trials=200, seed=2)["vectors"][0]["shard"]
    from robaudit.injection.shards import decode_array

    per_set = decode_array(raw["errors"], "float64", tuple(raw["shape"]), "test").max(axis=1)
    for epsilon in (1e-12, float(np.median(per_set)), 1e9):
        rate = _report(lenet, trials=200, seed=2, epsilon=epsilon)["failure_rate"]
        expected = int(np.sum(per_set > epsilon))
        assert (rate["exceeding"], rate["sets"]) == (expected, 200)
        assert (rate["low"], rate["high"]) == pytest.approx(wilson_interval(expected, 200, 0.95))


# --------------------------------------------------------------------------- check --workers


def test_check_workers_give_the_same_report(tmp_path):
    models = [SAMPLES / "lenet.onnx", SAMPLES / "digits_mlp.onnx", SAMPLES / "paper_mlp_sigmoid.onnx"]
    args = ["check", *models, "-e", "0.5", "--require-crash", "1", "--format", "json"]
    single = run_in_process(*args, expect=None, cwd=tmp_path)
    pooled = run_in_process(*args, "--workers", "2", expect=None, cwd=tmp_path)
    assert single.returncode == pooled.returncode in (0, 1), describe(pooled)
    assert json.loads(pooled.stdout) == json.loads(single.stdout)
    assert [m["name"] for m in json.loads(pooled.stdout)["models"]] == [m.name for m in models]


def test_merge_refuses_edited_shards(lenet):
    a = _report(lenet, Runner(shard=(0, 2)), trials=200, seed=1)
    b = _report(lenet, Runner(shard=(1, 2)), trials=200, seed=1)
    edits = {
        "index": lambda r: r["shard"].update(index="x"),
        "vectors": lambda r: r.pop("vectors"),
        "errors": lambda r: r["vectors"][0]["shard"].update(errors="not base64!"),
        "slice": lambda r: r["vectors"][0]["shard"].update(sets=[90, 200]),
    }
    for name, edit in edits.items():
        edited = json.loads(json.dumps(b))
        edit(edited)
        with pytest.raises(ShardError):
            merge_reports([("a", a), (name, edited)])


def test_pool_workers_start_with_ctrl_c_blocked():
    """A terminal's Ctrl-C reaches the whole process group: a worker that got it while Python started printed a
    KeyboardInterrupt traceback under the report. The workers start with it blocked (the parent ends them), and
    the parent's own mask and handler are as before afterwards."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, set()), signal.getsignal(signal.SIGINT)
    masks = map_in_processes(functools.partial(signal.pthread_sigmask, signal.SIG_BLOCK), [set(), set()], 2)
    assert all(signal.SIGINT in mask for mask in masks)
    assert (signal.pthread_sigmask(signal.SIG_BLOCK, set()), signal.getsignal(signal.SIGINT)) == before
    assert signal.SIGINT not in before[0]


def test_pool_workers_from_another_thread_keep_ctrl_c():
    """Called from a Python caller's own thread, the pool cannot end its workers on Ctrl-C (it raises in the main
    thread only): the workers keep the terminal's Ctrl-C and stop on it themselves (reviewer's finding)."""
    import threading

    masks: list = []
    thread = threading.Thread(
        target=lambda: masks.extend(
            map_in_processes(functools.partial(signal.pthread_sigmask, signal.SIG_BLOCK), [set(), set()], 2)
        )
    )
    thread.start()
    thread.join(timeout=120)
    assert len(masks) == 2 and not any(signal.SIGINT in mask for mask in masks), masks


@pytest.fixture
def ctrl_c():
    """Ctrl-C raises KeyboardInterrupt in this process during the test, as in a terminal (a test run in the
    background — CI steps, ``make test &`` — starts with SIGINT ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_ctrl_c_while_the_workers_start_is_not_lost(monkeypatch, ctrl_c):
    """A Ctrl-C that lands while the pool starts its workers waits (blocked) and then stops the parent."""
    from robaudit.injection import workers

    held = workers._interrupts_held

    @contextlib.contextmanager
    def interrupted_meanwhile():
        with held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)  # not delivered while blocked
            yield

    monkeypatch.setattr(workers, "_interrupts_held", interrupted_meanwhile)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        map_in_processes(time.sleep, [60.0, 60.0], 2)
    assert time.monotonic() - start < 30.0
    assert multiprocessing.active_children() == []


def test_ctrl_c_in_the_parent_ends_the_workers_at_once(ctrl_c):
    """The workers ignore Ctrl-C, and a slice already handed to one cannot be cancelled: the parent must end
    them, not wait for their minute of work (nor leave them running)."""
    timer = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGINT))  # as a terminal's Ctrl-C: a real signal
    start = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            map_in_processes(time.sleep, [60.0, 60.0], 2)
    finally:
        timer.cancel()
    assert time.monotonic() - start < 30.0
    assert multiprocessing.active_children() == []


def test_shards_that_drew_one_set_merge_into_the_single_run_report(tmp_path):
    """Two neurons, one crash: every shard draws both sets, so the shards' worst lists repeat them; merged, each is
    listed once, as the single run lists it."""
    import onnx
    from onnx import TensorProto
    from test_float16 import half_network

    model = half_network([np.ones((2, 2)), np.ones((2, 1))], [np.zeros(2), np.zeros(1)], ["Relu"], True, None,
                         elem=TensorProto.FLOAT)
    onnx.save(model, tmp_path / "two.onnx")
    loaded, network = load_network(tmp_path / "two.onnx", NetworkOptions())
    pair = (network, model_info(loaded))
    single = _report(pair, trials=600, seed=2, counts=(1,))
    assert len(single["vectors"][0]["worst"]) == 2
    shards = [(f"s{i}", _report(pair, Runner(shard=(i, 3)), trials=600, seed=2, counts=(1,))) for i in range(3)]
    assert merge_reports(shards) == single
