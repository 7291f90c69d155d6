"""PyTorch exports (both exporters) of a GRU and a bidirectional LSTM text classifier (token ids →
Embedding → GRU/LSTM → Linear, hidden 8, 6 steps; docs/method.md §14): ``inject`` fails the same
units at every step as an independent numpy forward does, random failure sets of that forward
stay under the bound, and so does ``inject --search worst``."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import run_in_process
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from robaudit.bounds.audit import load_network
from robaudit.bounds.fep import Analysis, FailureModel, PaperBound
from robaudit.bounds.tight import TightBound
from robaudit.graph.network import NetworkOptions
from robaudit.injection.instrument import FaultBatch, instrument, neuron_site
from robaudit.injection.sandbox import Evaluator

torch = pytest.importorskip("torch")

#: What PyTorch 2.13 says while exporting nn.GRU/nn.LSTM (both exporters): nothing robaudit can act on.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Converting a tensor to a Python boolean"),
    pytest.mark.filterwarnings("ignore:_check_is_size will be removed:FutureWarning"),
    pytest.mark.filterwarnings("ignore:The tensor attributes self.rnn:UserWarning"),
]

VOCAB, EMBED, HIDDEN, STEPS, CLASSES = 20, 5, 8, 6, 3


class Classifier(torch.nn.Module):
    """ids → Embedding → GRU or bidirectional LSTM → Linear on the last time step."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, EMBED)
        if kind == "gru":
            self.rnn = torch.nn.GRU(EMBED, HIDDEN, batch_first=True)
        else:
            self.rnn = torch.nn.LSTM(EMBED, HIDDEN, batch_first=True, bidirectional=True)
        self.out = torch.nn.Linear(HIDDEN * (1 if kind == "gru" else 2), CLASSES)

    def forward(self, ids):
        y, _ = self.rnn(self.emb(ids))
        return self.out(y[:, -1])


_CACHE: dict = {}


def exported(kind: str, dynamo: bool, directory: Path) -> tuple[Path, Classifier]:
    if (kind, dynamo) not in _CACHE:
        torch.manual_seed(0)
        model = Classifier(kind).eval()
        ids = torch.randint(0, VOCAB, (1, STEPS))
        path = directory / f"{kind}_{'dynamo' if dynamo else 'legacy'}.onnx"
        kwargs: dict = {"input_names": ["ids"], "output_names": ["y"], "dynamo": dynamo}
        if dynamo:
            kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=1024)},)
        else:
            kwargs["opset_version"] = 17
            kwargs["dynamic_axes"] = {"ids": {0: "N"}, "y": {0: "N"}}
        torch.onnx.export(model, (ids,), str(path), **kwargs)
        _CACHE[kind, dynamo] = (path, model)
    return _CACHE[kind, dynamo]


CASES = [(kind, dynamo) for kind in ("gru", "lstm") for dynamo in (False, True)]


@pytest.fixture(scope="module")
def directory(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("recurrent_exports")


# --------------------------------------------------------------------------- independent forward


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def reference(model: Classifier, ids: np.ndarray, failed: dict[int, float] | None = None) -> np.ndarray:
    """The classifier in numpy from PyTorch's weights (PyTorch's gate order), with hidden unit
    j = d·H + i of direction d sending failed[j] at every time step, as read by the next step and
    by the output."""
    failed = failed or {}
    table = model.emb.weight.detach().double().numpy()
    x = table[ids]  # [batch, T, E]
    rnn, dirs = model.rnn, 2 if isinstance(model.rnn, torch.nn.LSTM) else 1
    outputs = []
    for d in range(dirs):
        suffix = "_reverse" if d else ""
        w_ih, w_hh = (getattr(rnn, f"weight_{k}_l0{suffix}").detach().double().numpy() for k in ("ih", "hh"))
        b_ih, b_hh = (getattr(rnn, f"bias_{k}_l0{suffix}").detach().double().numpy() for k in ("ih", "hh"))
        h = np.zeros((x.shape[0], HIDDEN))
        c = np.zeros_like(h)
        per_time = [None] * STEPS
        for t in reversed(range(STEPS)) if d else range(STEPS):
            gx, gh = x[:, t] @ w_ih.T + b_ih, h @ w_hh.T + b_hh
            if dirs == 1:  # GRU: r, z, n
                r = _sigmoid(gx[:, :HIDDEN] + gh[:, :HIDDEN])
                z = _sigmoid(gx[:, HIDDEN : 2 * HIDDEN] + gh[:, HIDDEN : 2 * HIDDEN])
                n = np.tanh(gx[:, 2 * HIDDEN :] + r * gh[:, 2 * HIDDEN :])
                h = (1 - z) * n + z * h
            else:  # LSTM: i, f, g, o
                g = gx + gh
                i, f, o = (_sigmoid(g[:, k * HIDDEN : (k + 1) * HIDDEN]) for k in (0, 1, 3))
                c = f * c + i * np.tanh(g[:, 2 * HIDDEN : 3 * HIDDEN])
                h = o * np.tanh(c)
            h = h.copy()
            for unit, value in failed.items():
                if unit // HIDDEN == d:
                    h[:, unit % HIDDEN] = value
            per_time[t] = h
        outputs.append(per_time[-1])
    last = np.concatenate(outputs, axis=1)
    return last @ model.out.weight.detach().double().numpy().T + model.out.bias.detach().double().numpy()


@pytest.mark.parametrize(("kind", "dynamo"), CASES)
def test_reference_is_the_exported_model(directory, kind, dynamo):
    path, model = exported(kind, dynamo, directory)
    ids = np.random.default_rng(0).integers(0, VOCAB, (16, STEPS))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # the dynamo exporter fixes the batch of a GRU/LSTM to the example's (1): one row at a time
    got = np.concatenate([session.run(None, {"ids": ids[i : i + 1]})[0] for i in range(len(ids))])
    np.testing.assert_allclose(got, reference(model, ids), atol=1e-5)


@pytest.mark.parametrize(("kind", "dynamo"), CASES)
def test_inject_fails_the_same_units_at_every_step(directory, kind, dynamo):
    """robaudit's instrumentation of the unrolled graph gives the error of the numpy forward that
    fails the same units (same value at every step)."""
    path, model = exported(kind, dynamo, directory)
    loaded, network = load_network(path, NetworkOptions())
    (layer,) = network.hidden_layers
    assert layer.kind == kind and layer.neurons == HIDDEN * (2 if kind == "lstm" else 1)
    assert len(layer.tied) == STEPS - 1
    rng = np.random.default_rng(1)
    ids = rng.integers(0, VOCAB, (8, STEPS))
    evaluator = Evaluator(instrument(network, (neuron_site(layer, 0),), loaded.opset), ids.astype(np.float32))
    configs = [rng.choice(layer.neurons, 3, replace=False) for _ in range(5)]
    values = [rng.uniform(-1, 1, 3) for _ in range(5)]
    batch = FaultBatch(5, {0: (np.array(configs), np.array(values))})
    errors = evaluator.evaluate(batch).errors
    clean = reference(model, ids)
    for row, (units, sent) in enumerate(zip(configs, values, strict=True)):
        faulty = reference(model, ids, dict(zip(units.tolist(), sent.tolist(), strict=True)))
        np.testing.assert_allclose(errors[row], np.abs(faulty - clean).max(axis=1), rtol=1e-4, atol=1e-5)


@functools.cache
def _bound(path: Path, failure: FailureModel, failed: int) -> float:
    _, network = load_network(path, NetworkOptions())
    analysis = Analysis(network, failure)
    return min(PaperBound(analysis).fep([failed]), TightBound(analysis).fep([failed]))


@pytest.mark.parametrize(("kind", "dynamo"), CASES)
@pytest.mark.parametrize("mode", ["crash", "byzantine"])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16), failed=st.integers(1, 3))
def test_independent_faults_stay_under_the_bound(directory, kind, dynamo, mode, seed, failed):
    """Random units failing at every step (crash: 0; byzantine: values in [−1, 1], extremes
    included) and random ids, computed by the numpy forward: never above the bound."""
    path, model = exported(kind, dynamo, directory)
    failure = FailureModel.crash() if mode == "crash" else FailureModel.byzantine(capacity=1.0)
    bound = _bound(path, failure, failed)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (64, STEPS))
    clean = reference(model, ids)
    units = rng.choice(HIDDEN * (2 if kind == "lstm" else 1), failed, replace=False)
    values = np.zeros(failed) if mode == "crash" else rng.choice([-1.0, 1.0, 0.3], failed)
    faulty = reference(model, ids, dict(zip(units.tolist(), values.tolist(), strict=True)))
    worst = float(np.abs(faulty - clean).max())
    assert worst <= bound * (1 + 1e-9), (worst, bound)


@pytest.mark.parametrize(("kind", "dynamo"), CASES)
@pytest.mark.parametrize("failure", [FailureModel.crash(), FailureModel.byzantine(capacity=1.0)])
def test_the_bound_is_at_most_the_output_layers_closed_form(directory, kind, dynamo, failure):
    """States and failed values lie in [−1, 1], so no output moves by more than 2·max_k Σ_j |W_out[k, j]| (the
    output cut of the boxes, docs/method.md §4.1, §14.2); the bound was 40–60 times that (213.6 on the GRU)."""
    path, model = exported(kind, dynamo, directory)
    closed_form = 2.0 * float(np.abs(model.out.weight.detach().double().numpy()).sum(axis=1).max())
    assert _bound(path, failure, 1) <= closed_form * (1 + 1e-6)


@pytest.mark.parametrize(("kind", "dynamo"), CASES)
@pytest.mark.parametrize("mode", [["--crash", "2"], ["--byzantine", "1", "--capacity", "1"]])
def test_worst_search_stays_under_the_bound(directory, kind, dynamo, mode):
    path, _ = exported(kind, dynamo, directory)
    result = run_in_process("inject", path, *mode, "--samples", "16", "--search", "worst", "--trials", "3",
                            "--format", "json")
    report = json.loads(result.stdout)
    assert all(v["violation"] is False for v in report["vectors"]), report["vectors"]
    assert all(0 < v["measured"]["max"] <= v["bound"] for v in report["vectors"])


def test_certify_refuses_recurrent_layers_in_one_line(directory, tmp_path):
    path, _ = exported("gru", False, directory)
    inputs = tmp_path / "ids.npy"
    np.save(inputs, np.zeros((2, STEPS)))
    result = run_in_process("certify", path, "--inputs", inputs, expect=2)
    assert "recurrent" in result.stderr and len(result.stderr.strip().splitlines()) == 1
