"""``fep_tight`` (per-neuron slopes, max-pool candidates, docs/method.md §4.3) against a strong
attack on networks trained here on scikit-learn's digits.

The attack (``benchmarks/trained_nets.attack``, torch autograd, shares no code with
robaudit) searches the failure set, the byzantine values and the input together, from
data points, random points and corners. Whatever it finds must stay below the bound of
the same failure vector. The trained networks cover what the slopes and candidates act
on: a Tanh layer, an overlapping max-pool, a BatchNorm after an activation, an SE gate
(Sigmoid times a tensor), residual blocks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from trained_nets import NETWORKS, AttackOptions, attack, digits, export, sites, train  # noqa: E402

from robaudit.bounds.audit import BoundOptions, bound_network, load_network, model_info  # noqa: E402
from robaudit.bounds.fep import Analysis, FailureModel  # noqa: E402
from robaudit.bounds.tight import TightBound  # noqa: E402
from robaudit.graph.network import NetworkOptions  # noqa: E402

FAST = ["mlp_tanh_64_32", "se_block"]
SLOW = ["cnn_bn_pool", "resnet_small", "mlp_32"]
_CACHE: dict[str, tuple] = {}


def _trained(name: str, directory: Path):
    if name not in _CACHE:
        torch.manual_seed(0)
        torch.set_num_threads(1)
        model = NETWORKS[name][0]()
        train(model, epochs=3)
        path = export(model, directory / f"{name}.onnx")
        loaded, network = load_network(path, NetworkOptions())
        with torch.no_grad():
            model(torch.zeros(1, 1, 8, 8))
        assert [la.neurons for la in network.hidden_layers] == [int(np.prod(s.seen.shape[1:])) for s in sites(model)]
        _CACHE[name] = (model, loaded, network)
    return _CACHE[name]


def _check(name: str, counts_seed: int, byzantine: bool, directory: Path, options: AttackOptions) -> None:
    model, loaded, network = _trained(name, directory)
    rng = np.random.default_rng(counts_seed)
    counts = [int(rng.integers(0, 3)) for _ in network.hidden_layers]
    failure = FailureModel.byzantine(float(rng.choice([0.5, 2.0]))) if byzantine else FailureModel.crash()
    result = bound_network(network, BoundOptions(epsilon=1.0, failure=failure, failures=tuple(counts)),
                           model_info(loaded))
    per_output = TightBound(Analysis(network, failure)).per_output(counts)
    targets = [int(k) for k in np.argsort(-per_output)[: options.targets]]
    data = digits()[0][:300].astype(np.float64)
    found = attack(model, counts, failure.failure_range, (0.0, 1.0), data, targets, options)
    # float32 weights folded by the exporter: ~1e-7 relative on outputs of magnitude ≲ 100
    assert found <= result.fep_tight * (1 + 1e-5) + 1e-4, (name, counts, failure, found, result.fep_tight)


@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(FAST), st.integers(0, 10**6), st.booleans())
def test_attack_stays_below_fep_tight_on_trained_nets(tmp_path_factory, name, seed, byzantine):
    directory = tmp_path_factory.mktemp("trained")
    _check(name, seed, byzantine, directory, AttackOptions(starts=9, steps=20, swap_rounds=1, targets=2))


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW + FAST)
@pytest.mark.parametrize("seed", range(4))
def test_slow_attack_stays_below_fep_tight(tmp_path, name, seed):
    _check(name, seed, seed % 2 == 1, tmp_path, AttackOptions())
