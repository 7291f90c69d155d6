"""Ray as the campaign engine: a local Ray started in this process gives the local report, a
lost worker's requests are retried, and a missing Ray or an unreachable cluster is one line."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from conftest import SAMPLES, describe, run_cli

from robaudit.bounds.audit import load_network, model_info
from robaudit.errors import OptionError
from robaudit.formats.report import report_dict
from robaudit.formats.serial import to_json
from robaudit.graph.network import NetworkOptions
from robaudit.injection.campaign import failure_vector, fault_sites, run_injection
from robaudit.injection.instrument import FaultBatch, instrument
from robaudit.injection.results import InjectOptions
from robaudit.injection.sandbox import Limits, open_evaluator
from robaudit.injection.workers import Runner

LENET = SAMPLES / "lenet.onnx"


@pytest.fixture(scope="module")
def ray():
    ray = pytest.importorskip("ray", reason="Ray is not installed here (pip install 'robaudit[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def lenet():
    loaded, network = load_network(LENET, NetworkOptions())
    return network, model_info(loaded)


def _report(lenet, runner: Runner, **kwargs) -> dict:
    network, info = lenet
    options = InjectOptions(vectors=(failure_vector(network, (2,)),), samples=8, runner=runner, **kwargs)
    return json.loads(to_json(report_dict(run_injection(network, options, info))))


@pytest.mark.parametrize(
    "search, trials",
    [("random", 300), pytest.param("worst", 20, marks=pytest.mark.slow)],  # worst: ~8 s of calls
)
def test_ray_gives_the_local_report(ray, lenet, search, trials):
    local = _report(lenet, Runner(1), search=search, trials=trials, seed=9)
    assert _report(lenet, Runner(2, backend="ray"), search=search, trials=trials, seed=9) == local


@pytest.mark.slow  # a worker killed and restarted: ~5 s of the default suite's 8 minutes
def test_a_lost_worker_is_restarted_and_its_request_retried(ray, lenet, tmp_path):
    from robaudit.injection.ray_backend import RayPool

    network, info = lenet
    vector = failure_vector(network, (1,))
    spec = instrument(network, fault_sites(network, [vector]), info.opset, False)
    inputs = np.random.default_rng(0).uniform(0, 1, (4, *network.input_shape[1:])).astype(np.float32)
    rng = np.random.default_rng(1)
    sizes = [site.neurons for site in spec.sites]
    parts = [
        FaultBatch(5, {s: (rng.integers(0, n, (5, 1)), np.zeros((5, 1))) for s, n in enumerate(sizes)}, {})
        for _ in range(4)
    ]
    reference = open_evaluator(spec, inputs, Limits(), isolate=False)
    expected = [reference.evaluate(part).errors for part in parts]
    marker = tmp_path / "died"
    pool = RayPool(spec, inputs, Limits(timeout_s=120), 2, fail_marker=str(marker))
    try:
        got = [answer.errors for answer in pool.evaluate_parts(parts, None)]
    finally:
        pool.close()
    assert marker.exists()  # a worker really died on its first request
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))


def test_missing_ray_is_one_line(monkeypatch):
    from robaudit.injection.ray_backend import connect

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(OptionError, match=r"--backend ray needs Ray: pip install 'robaudit\[ray\]'"):
        connect(None)


def test_unreachable_cluster_exits_2_in_one_line():
    pytest.importorskip("ray", reason="Ray is not installed here")
    proc = run_cli(
        "inject", LENET, "--samples", "4", "--trials", "10", "--backend", "ray", "--address", "127.0.0.1:9", expect=2
    )
    assert "cannot reach a Ray cluster at '127.0.0.1:9'" in proc.stderr, describe(proc)
    assert proc.stderr.count("\n") == 1, describe(proc)
