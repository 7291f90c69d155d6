"""Bound against the worst error found on GRU and bidirectional LSTM text classifiers (docs/method.md §14).

The benchmark trains its own classifiers with PyTorch in a few seconds — token ids (vocabulary
20, 6 steps) → Embedding(5) → GRU(8) or bidirectional LSTM(8) → Linear(3), the class being the
first of the tokens 1, 2, 3 to appear (0 if none) — exports them with the legacy exporter, and
prints for one failed hidden unit (crash, and byzantine in [−1, 1], failing at every step):

* ``bound``: ``robaudit bound`` (tight method);
* ``worst``: the largest error of an **exhaustive** search over every unit (and, byzantine, both
  extremes of the range) on 2,000 random id sequences, computed by an independent numpy forward
  from PyTorch's weights;
* ``inject``: the largest error ``robaudit inject --search worst`` finds on 200 samples.

The same for the untrained (initial) weights. Run: ``.venv/bin/python benchmarks/bench_recurrent.py``
(about a minute on one core).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from robaudit.bounds.audit import load_network  # noqa: E402
from robaudit.bounds.fep import Analysis, FailureModel, PaperBound  # noqa: E402
from robaudit.bounds.results import ModelInfo  # noqa: E402
from robaudit.bounds.tight import TightBound  # noqa: E402
from robaudit.graph.network import NetworkOptions  # noqa: E402
from robaudit.injection.campaign import run_injection  # noqa: E402
from robaudit.injection.results import FailureVector, InjectOptions  # noqa: E402

torch.set_num_threads(1)
VOCAB, STEPS, HIDDEN = 20, 6, 8


class Classifier(torch.nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, 5)
        bidirectional = kind == "lstm"
        cell = torch.nn.GRU if kind == "gru" else torch.nn.LSTM
        self.rnn = cell(5, HIDDEN, batch_first=True, bidirectional=bidirectional)
        self.out = torch.nn.Linear(HIDDEN * (2 if bidirectional else 1), 3)

    def forward(self, ids):
        y, _ = self.rnn(self.emb(ids))
        return self.out(y[:, -1])


def task(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    ids = rng.integers(0, VOCAB, (count, STEPS))
    marked = np.isin(ids, (1, 2, 3))
    first = np.where(marked.any(axis=1), ids[np.arange(count), marked.argmax(axis=1)], 0)
    return ids, np.where(first == 0, 0, first - 1).astype(np.int64)


def train(model: Classifier, steps: int = 300) -> float:
    ids, labels = task(4000, np.random.default_rng(0))
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    x, y = torch.from_numpy(ids), torch.from_numpy(labels)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    test, truth = task(1000, np.random.default_rng(1))
    with torch.no_grad():
        return float((model(torch.from_numpy(test)).argmax(1).numpy() == truth).mean())


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def forward(model: Classifier, ids: np.ndarray, unit: int | None = None, value: float = 0.0) -> np.ndarray:
    """numpy forward from PyTorch's weights; hidden unit ``unit`` (d·H + i) sends ``value`` at every step."""
    x = model.emb.weight.detach().double().numpy()[ids]
    lstm = isinstance(model.rnn, torch.nn.LSTM)
    lasts = []
    for d in range(2 if lstm else 1):
        sfx = "_reverse" if d else ""
        w_ih, w_hh = (getattr(model.rnn, f"weight_{k}_l0{sfx}").detach().double().numpy() for k in ("ih", "hh"))
        b_ih, b_hh = (getattr(model.rnn, f"bias_{k}_l0{sfx}").detach().double().numpy() for k in ("ih", "hh"))
        h = np.zeros((len(ids), HIDDEN))
        c = np.zeros_like(h)
        states = {}
        for t in reversed(range(STEPS)) if d else range(STEPS):
            gx, gh = x[:, t] @ w_ih.T + b_ih, h @ w_hh.T + b_hh
            if lstm:
                g = gx + gh
                i, f, o = (_sigmoid(g[:, k * HIDDEN : (k + 1) * HIDDEN]) for k in (0, 1, 3))
                c = f * c + i * np.tanh(g[:, 2 * HIDDEN : 3 * HIDDEN])
                h = o * np.tanh(c)
            else:
                r, z = _sigmoid(gx[:, :HIDDEN] + gh[:, :HIDDEN]), _sigmoid(gx[:, HIDDEN:16] + gh[:, HIDDEN:16])
                h = (1 - z) * np.tanh(gx[:, 16:] + r * gh[:, 16:]) + z * h
            if unit is not None and unit // HIDDEN == d:
                h = h.copy()
                h[:, unit % HIDDEN] = value
            states[t] = h
        lasts.append(states[STEPS - 1])
    last = np.concatenate(lasts, axis=1)
    return last @ model.out.weight.detach().double().numpy().T + model.out.bias.detach().double().numpy()


def exhaustive(model: Classifier, values: tuple[float, ...]) -> float:
    ids = np.random.default_rng(2).integers(0, VOCAB, (2000, STEPS))
    clean = forward(model, ids)
    units = HIDDEN * (2 if isinstance(model.rnn, torch.nn.LSTM) else 1)
    return max(float(np.abs(forward(model, ids, u, v) - clean).max()) for u in range(units) for v in values)


def measure(model: Classifier, path: Path) -> list[str]:
    torch.onnx.export(model, (torch.zeros(1, STEPS, dtype=torch.long),), str(path), input_names=["ids"],
                      output_names=["y"], dynamic_axes={"ids": {0: "N"}, "y": {0: "N"}}, opset_version=17,
                      dynamo=False)  # fmt: skip
    _, network = load_network(path, NetworkOptions())
    rows = []
    for mode, failure, values in (
        ("crash", FailureModel.crash(), (0.0,)),
        ("byzantine", FailureModel.byzantine(capacity=1.0), (-1.0, 1.0)),
    ):
        analysis = Analysis(network, failure)
        bound = min(PaperBound(analysis).fep([1]), TightBound(analysis).fep([1]))
        worst = exhaustive(model, values)
        options = InjectOptions(
            failure=failure, vectors=(FailureVector((1,)),), samples=200, search="worst", isolate=False
        )
        found = run_injection(network, options, ModelInfo(str(path), "", "", 17)).vectors[0].measured.max
        rows.append(
            f"{mode:9s}  bound {bound:9.4g}  worst {worst:7.4f}  inject {found:7.4f}  bound/worst {bound / worst:8.1f}"
        )
    return rows


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        for kind in ("gru", "lstm"):
            for trained in (False, True):
                torch.manual_seed(0)
                model = Classifier(kind)
                accuracy = train(model) if trained else float("nan")
                model.eval()
                label = f"{kind} {'trained' if trained else 'initial'}"
                print(f"{label}  (test accuracy {accuracy:.3f})" if trained else label)
                for row in measure(model, Path(folder) / f"{kind}_{trained}.onnx"):
                    print("   ", row)


if __name__ == "__main__":
    main()
