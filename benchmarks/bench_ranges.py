"""How much do CROWN ranges tighten IBP, what does it change in ``bound``, and at what cost?

For the samples (LeNet, the small ResNet, the MobileNet block with an SE gate) and two
networks trained here on digits (an MLP and a CNN with BatchNorm, see
``benchmarks/trained_nets.py``), all measured in this run:

* per layer, mean pre-activation width IBP / CROWN (> 1: CROWN is tighter), and how far
  back the layer was back-substituted (``input``, ``w<k>`` steps, or ``ibp``);
* ``bound`` at ε with 1 crashed neuron per layer: fep_tight with each range method, and the
  tolerated counts (per layer, uniform, total);
* the wall time of ``bound`` with each range method (best of 3, one BLAS thread).

    .venv/bin/python benchmarks/bench_ranges.py [--epsilon 1]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from robaudit.bounds.audit import BoundOptions, compute_bound, load_network  # noqa: E402
from robaudit.graph.network import NetworkOptions  # noqa: E402

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def best_of(function, repeats: int = 3) -> float:
    """Smallest wall time of ``repeats`` calls, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def width_ratios(path: Path) -> list[str]:
    """Per layer: name, mean width IBP / CROWN of its pre-activation, and its window."""
    _, ibp = load_network(path, NetworkOptions(ranges="ibp"))
    _, crown = load_network(path, NetworkOptions(ranges="crown"))
    rows = []
    for layer in crown.layers:
        a, b = ibp.clean[layer.preact_value], crown.clean[layer.preact_value]
        ratio = float(np.mean(a.hi - a.lo)) / max(float(np.mean(b.hi - b.lo)), 1e-300)
        steps, reached = crown.range_report.windows.get(layer.preact_value, (0, False))
        window = "input" if reached else (f"w{steps}" if steps else "ibp")
        rows.append(f"{layer.name}:{ratio:.2f}({window})")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=1.0)
    args = parser.parse_args()
    paths = [SAMPLES / n for n in ("lenet.onnx", "resnet_small.onnx", "mobilenet_se.onnx")]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            import torch

            from benchmarks.trained_nets import MLP, SmallCNN, export, train

            for name, build in (("digits_mlp", lambda: MLP([64, 32])), ("digits_cnn_bn", SmallCNN)):
                torch.manual_seed(0)
                model = build()
                accuracy = train(model)
                print(f"trained {name}: held-out accuracy {accuracy:.3f}")
                paths.append(export(model, Path(tmp) / f"{name}.onnx"))
        except ImportError as exc:  # torch / scikit-learn missing: samples only
            print(f"trained networks skipped ({exc})")
        for path in paths:
            report(path, args.epsilon)
    return 0


def report(path: Path, epsilon: float) -> None:
    print(f"\n== {path.name}")
    print("  width IBP/CROWN per layer: " + "  ".join(width_ratios(path)))
    results, seconds = {}, {}
    for ranges in ("ibp", "crown"):
        options = BoundOptions(epsilon=epsilon, failures=(1,), network=NetworkOptions(ranges=ranges))
        results[ranges] = compute_bound(path, options)
        seconds[ranges] = best_of(lambda o=options: compute_bound(path, o))
    for ranges, result in results.items():
        per_layer = [la.max_failures for la in result.layers]
        print(
            f"  {ranges:5s}: fep_tight(1/layer) {result.fep_tight:.4g}  fep_paper {result.fep_paper:.4g}  "
            f"tolerated at ε={epsilon:g}: per layer {per_layer}, uniform {result.uniform}, total {result.total}; "
            f"bound {seconds[ranges]:.3f} s"
        )
    print(
        f"  ratio IBP/CROWN: fep_tight {results['ibp'].fep_tight / results['crown'].fep_tight:.2f}x, "
        f"bound time CROWN/IBP {seconds['crown'] / seconds['ibp']:.2f}x"
    )


if __name__ == "__main__":
    raise SystemExit(main())
