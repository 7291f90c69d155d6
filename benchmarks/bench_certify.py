"""Per-input certificates and the joint worst-case search on trained networks (docs/method.md §7, §8.2).

The benchmark trains its own networks on scikit-learn's ``load_digits`` (8×8 images in
[0, 1]) with PyTorch in a few seconds — an MLP, a small CNN and a residual MLP — exports
them to ONNX (logits) and prints, for 1 crashed / 1 byzantine (C = 1) neuron in every hidden
layer:

* ``cert/worst``: the largest certificate over 200 test inputs against the largest error an
  **exhaustive** search finds on the same inputs (every pair of failed neurons, one per hidden
  layer, byzantine values at both extremes; evaluated in torch, independent of robaudit).
  Targets: ≤ 2 for MLPs, ≤ 4 for CNNs/ResNets.
* ``inject/joint``: the best error of ``robaudit inject --search worst`` (which also moves the
  input inside the domain) against an independent joint search (torch autograd: projected
  gradient ascent on the input from random points, corners and given inputs, alternating with
  an exhaustive choice of the failed pair and values). Targets: median ≥ 0.9, worst ≥ 0.6.
* LeNet (``sample_models/lenet.onnx``, 200 inputs of ``lenet_inputs.npz``): the time of
  ``certify`` against ``inject --search random --trials 200`` on the same inputs (target ≤ 20×).

Run: ``.venv/bin/python benchmarks/bench_certify.py`` (a few minutes on one core); ``--speed``
runs only the LeNet timing (also ``certify --workers 2`` and failures in the dense layers only).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from robaudit.bounds.audit import load_network  # noqa: E402
from robaudit.bounds.certify import certify_inputs  # noqa: E402
from robaudit.bounds.fep import FailureModel  # noqa: E402
from robaudit.bounds.results import ModelInfo  # noqa: E402
from robaudit.graph.network import NetworkOptions  # noqa: E402
from robaudit.injection.campaign import run_injection  # noqa: E402
from robaudit.injection.results import FailureVector, InjectOptions  # noqa: E402

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
INPUTS = 200


# --------------------------------------------------------------------------- trained networks


class Faulty(torch.nn.Module):
    """A network whose hidden activations pass through ``h·keep + repl`` (faults, batched)."""

    def hidden(self, h, faults, i):
        if faults is None:
            return h
        keep, repl = faults[i]
        return h * keep.reshape(h.shape) + repl.reshape(h.shape)


class MLP(Faulty):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = torch.nn.Linear(64, 48), torch.nn.Linear(48, 24), torch.nn.Linear(24, 10)
        self.sizes = [48, 24]

    def forward(self, x, faults=None):
        h = self.hidden(torch.relu(self.fc1(x)), faults, 0)
        h = self.hidden(torch.relu(self.fc2(h)), faults, 1)
        return self.out(h)


class CNN(Faulty):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 4 * 4, 24)
        self.out = torch.nn.Linear(24, 10)
        self.sizes = [4 * 8 * 8, 24]

    def forward(self, x, faults=None):
        x = x.reshape(-1, 1, 8, 8)
        h = self.hidden(torch.relu(self.conv(x)), faults, 0)
        h = torch.nn.functional.max_pool2d(h, 2).flatten(1)
        h = self.hidden(torch.relu(self.fc(h)), faults, 1)
        return self.out(h)


class ResMLP(Faulty):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = torch.nn.Linear(64, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 10)
        self.sizes = [32, 32]

    def forward(self, x, faults=None):
        h = self.hidden(torch.relu(self.fc1(x)), faults, 0)
        g = self.hidden(torch.relu(self.fc2(h)), faults, 1)
        return self.out(h + g)


def data():
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    return x[:1500], y[:1500], x[1500 : 1500 + INPUTS], y[1500 : 1500 + INPUTS]


def train(model, x, y, epochs: int = 150):
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model.eval()


def export(model, path: Path, shape) -> None:
    torch.onnx.export(
        model, (torch.zeros(shape),), str(path), input_names=["x"], output_names=["logits"],
        dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}}, opset_version=17, dynamo=False,
    )


# --------------------------------------------------------------------------- independent searches


def pair_faults(model, pairs, values, batch):
    """Faults for every (pair, values) × input: keep/repl per hidden layer, [P·B, N_l]."""
    out = []
    for layer, size in enumerate(model.sizes):
        keep = torch.ones(len(pairs), size)
        repl = torch.zeros(len(pairs), size)
        idx = torch.tensor([p[layer] for p in pairs])
        keep[torch.arange(len(pairs)), idx] = 0.0
        repl[torch.arange(len(pairs)), idx] = torch.tensor([v[layer] for v in values], dtype=torch.float32)
        out.append((keep.repeat_interleave(batch, 0), repl.repeat_interleave(batch, 0)))
    return out


def all_pairs(model, extremes):
    pairs, values = [], []
    for i in range(model.sizes[0]):
        for j in range(model.sizes[1]):
            for a in extremes:
                for b in extremes:
                    pairs.append((i, j))
                    values.append((a, b))
    return pairs, values


@torch.no_grad()
def exhaustive(model, x, extremes, chunk: int = 256):
    """Per input, the largest error over every failed pair (one per hidden layer) and value extremes."""
    pairs, values = all_pairs(model, extremes)
    xt = torch.from_numpy(x)
    clean = model(xt)
    worst = torch.zeros(len(x))
    best = [None] * len(x)
    for start in range(0, len(pairs), chunk):
        p, v = pairs[start : start + chunk], values[start : start + chunk]
        faulty = model(xt.repeat(len(p), 1), pair_faults(model, p, v, len(x))).reshape(len(p), len(x), -1)
        err = (faulty - clean[None]).abs().amax(-1)
        top, arg = err.max(0)
        better = top > worst
        for i in torch.nonzero(better).flatten().tolist():
            best[i] = (p[arg[i]], v[arg[i]])
        worst = torch.maximum(worst, top)
    return worst.numpy(), best


def torch_joint(model, given, extremes, rng, starts: int = 6, rounds: int = 3, steps: int = 25):
    """Independent joint search: exhaustive failed pair at x, then PGD (autograd) on x, alternated."""
    points = [given[i] for i in rng.choice(len(given), 2, replace=False)]
    points += [rng.uniform(0, 1, 64).astype(np.float32) for _ in range(2)]
    points += [(rng.random(64) < 0.5).astype(np.float32), np.ones(64, np.float32)]
    best = 0.0
    for x0 in points[:starts]:
        x = torch.from_numpy(np.asarray(x0, np.float32)).clone()
        for _ in range(rounds):
            errs, sets = exhaustive(model, x[None].numpy(), extremes)
            (i, j), (a, b) = sets[0]
            faults = pair_faults(model, [(i, j)], [(a, b)], 1)
            step = 0.25
            for _ in range(steps):
                x.requires_grad_(True)
                diff = (model(x[None], faults) - model(x[None])).abs().max()
                (grad,) = torch.autograd.grad(diff, x)
                best = max(best, float(diff))
                x = (x.detach() + step * grad.sign()).clamp(0, 1)
                step *= 0.85
            with torch.no_grad():
                best = max(best, float((model(x[None], faults) - model(x[None])).abs().max()))
    return best


# --------------------------------------------------------------------------- robaudit


def info(path: Path) -> ModelInfo:
    return ModelInfo(str(path), "", "bench", 17)


def robaudit_worst(path: Path, failure: FailureModel, inputs: np.ndarray, hidden: int, seed: int) -> float:
    _, network = load_network(path, NetworkOptions())
    options = InjectOptions(
        failure=failure, vectors=(FailureVector((1,) * hidden),), search="worst", trials=50, seed=seed,
        inputs=inputs, isolate=False,
    )
    return run_injection(network, options, info(path)).vectors[0].best_found


def main() -> None:
    x_train, y_train, x_test, y_test = data()
    rng = np.random.default_rng(0)
    cert_rows, joint_ratios = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cls, limit in (("MLP", MLP, 2.0), ("CNN", CNN, 4.0), ("ResMLP", ResMLP, 4.0)):
            start = time.perf_counter()
            model = train(cls(), x_train, y_train)
            accuracy = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
            path = Path(tmp) / f"{name}.onnx"
            export(model, path, (1, 64))
            trained = time.perf_counter() - start
            _, network = load_network(path, NetworkOptions())
            for mode, failure, extremes in (
                ("crash", FailureModel.crash(), (0.0,)),
                ("byzantine C=1", FailureModel.byzantine(1.0), (-1.0, 1.0)),
            ):
                t0 = time.perf_counter()
                result = certify_inputs(network, failure, x_test, [1, 1], 1.0, layer_counts=False)
                t_cert = time.perf_counter() - t0
                worst, _ = exhaustive(model, x_test, extremes)
                bounds = np.array([c.bound for c in result.inputs])
                ratio = float(bounds.max() / worst.max())
                per_input = float(np.median(bounds / np.maximum(worst, 1e-12)))
                cert_rows.append((name, mode, ratio, limit))
                found = robaudit_worst(path, failure, x_test, 2, 0)
                independent = torch_joint(model, x_test, extremes, rng)
                joint_ratios.append(found / independent)
                print(
                    f"{name:7s} {mode:14s} acc {accuracy:.3f} (trained {trained:.1f}s) | certify {t_cert:5.1f}s "
                    f"max cert {bounds.max():8.3f} / exhaustive worst {worst.max():8.3f} = {ratio:5.2f} "
                    f"(target ≤ {limit:g}; median per input {per_input:.2f}); certified {result.certified_fraction:.1%}"
                    f" | inject worst (moving input) {found:8.3f} / independent joint {independent:8.3f}"
                    f" = {found / independent:5.2f}",
                    flush=True,
                )
    print(
        f"inject/joint: median {statistics.median(joint_ratios):.2f} (target ≥ 0.9), "
        f"worst {min(joint_ratios):.2f} (target ≥ 0.6)"
    )
    print("cert/worst within target:", all(r <= lim for _, _, r, lim in cert_rows))
    lenet_speed()


def lenet_speed() -> None:
    """certify vs inject --search random --trials 200 on the 200 LeNet inputs, commands timed in one run."""
    model = ROOT / "sample_models" / "lenet.onnx"
    inputs = ROOT / "sample_models" / "lenet_inputs.npz"
    base = [sys.executable, "-m", "robaudit"]

    def timed(args) -> float:
        start = time.perf_counter()
        subprocess.run(base + args, check=True, capture_output=True)
        return time.perf_counter() - start

    common = [str(model), "--inputs", str(inputs), "-q", "-f", "json"]
    t_inject = timed(["inject", *common, "--crash", "1", "--search", "random", "--trials", "200"])
    t_cert = timed(["certify", *common, "--crash", "1", "--no-layer-counts"])
    t_dense = timed(["certify", *common, "--crash", "0,0,1,1", "--no-layer-counts"])
    t_two = timed(["certify", *common, "--crash", "1", "--no-layer-counts", "--workers", "2"])
    print(
        f"LeNet, 200 inputs, 1 crash per layer: certify {t_cert:.1f}s / inject --search random --trials 200 "
        f"{t_inject:.1f}s = {t_cert / t_inject:.1f}x (target ≤ 20x); failures in the dense layers only "
        f"{t_dense:.1f}s = {t_dense / t_inject:.1f}x; certify --workers 2 {t_two:.1f}s "
        f"({t_cert / t_two:.2f}x faster than 1 worker, {usable_cores()} cores)"
    )


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


if __name__ == "__main__":
    if "--speed" in sys.argv[1:]:
        lenet_speed()
    else:
        main()
