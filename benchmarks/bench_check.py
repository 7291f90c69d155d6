"""Speed of the ``check`` gate on the sample models, against loading the model.

Gate time on the sample models should be dominated by model loading. For
each sample model this prints, best of several runs in this process:

* ``load``  — ``load_network`` (read + sha256 + parse + layer graph with interval
  bounds): what any audit of the file must do;
* ``check`` — ``check_model`` of a passing policy (uniform, per-layer and total
  requirements, crash), load included, and its ratio to ``load``;
* ``unmet`` — the same with one unmet layer requirement, i.e. with the weight-target
  search of ``robaudit.gate.remedy`` (only paid when the gate fails).

and, as a CI job sees it, the wall time of the ``robaudit check`` command against
``robaudit inspect`` of the same model (both start Python and import the same
libraries), with their ratio.

    .venv/bin/python benchmarks/bench_check.py [--repeat 5] [--no-cli]
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from robaudit.bounds.audit import load_network  # noqa: E402
from robaudit.gate.gate import check_model  # noqa: E402
from robaudit.gate.policy import ModelPolicy, Requirement  # noqa: E402
from robaudit.graph.network import NetworkOptions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
MODELS = ("paper_mlp_sigmoid", "digits_mlp", "lenet", "resnet_small", "resnet_small_bn", "mobilenet_se")
EPSILON = 1.0


def best_of(repeat: int, func) -> float:
    """Smallest wall time of ``repeat`` calls."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return min(times)


def policy(path: Path, unmet: bool) -> ModelPolicy:
    """Uniform, first-layer and total requirements of 0 failures (met); or, for ``unmet``, one
    failure more than the first layer that is not wholly tolerated tolerates alone."""
    requirements = [
        Requirement("require.crash", "uniform", "crash", 0),
        Requirement("require.layers.1", "layer", "crash", 0, "1"),
        Requirement("require.total", "total", "crash", 0),
    ]
    entry = ModelPolicy(str(path), (str(path),), EPSILON, requirements=tuple(requirements))
    if not unmet:
        return entry
    layers = check_model(str(path), entry).bounds[0].layers
    layer = next(la for la in layers if la.max_failures < la.neurons)
    requirements[1] = Requirement(f"require.layers.{layer.name}", "layer", "crash", layer.max_failures + 1, layer.name)
    return ModelPolicy(str(path), (str(path),), EPSILON, requirements=tuple(requirements))


def cli_seconds(repeat: int, *args: str) -> float:
    """Best wall time of the ``robaudit`` command with these arguments."""
    command = [sys.executable, "-m", "robaudit", *args]
    return best_of(repeat, lambda: subprocess.run(command, capture_output=True, check=False, cwd=ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-cli", action="store_true", help="skip the command-line timings")
    args = parser.parse_args()
    print(f"check gate vs model loading, ε = {EPSILON}, best of {args.repeat} (in process)")
    print(f"{'model':20s} {'load':>9s} {'check':>9s} {'ratio':>7s} {'unmet':>9s} {'ratio':>7s}")
    for name in MODELS:
        path = SAMPLES / f"{name}.onnx"
        load = best_of(args.repeat, lambda path=path: load_network(path, NetworkOptions()))
        met, unmet = policy(path, False), policy(path, True)
        check = best_of(args.repeat, lambda path=path, met=met: check_model(str(path), met))
        failing = best_of(max(1, args.repeat // 3), lambda path=path, unmet=unmet: check_model(str(path), unmet))
        print(
            f"{name:20s} {load * 1e3:7.1f}ms {check * 1e3:7.1f}ms {check / load:6.1f}x "
            f"{failing * 1e3:7.0f}ms {failing / load:6.0f}x"
        )
    if args.no_cli:
        return 0
    print(f"\ncommand wall time (Python start-up and imports included), best of {min(args.repeat, 3)}")
    print(f"{'model':20s} {'inspect':>9s} {'check':>9s} {'ratio':>7s}")
    for name in MODELS:
        path = str(SAMPLES / f"{name}.onnx")
        inspect = cli_seconds(min(args.repeat, 3), "inspect", path)
        gate = cli_seconds(min(args.repeat, 3), "check", path, "-e", str(EPSILON), "--require-crash", "0")
        print(f"{name:20s} {inspect * 1e3:7.0f}ms {gate * 1e3:7.0f}ms {gate / inspect:6.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
