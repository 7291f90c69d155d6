"""Benchmark: how tight and how fast is ``--method tight``?

Prints, for the LeNet and ResNet samples with a few crashed neurons per layer:
fep_tight / fep_paper, fep_tight / worst measured error (worst-case search of
``robaudit inject`` when available), and the time of ``bound --method tight`` next to
one onnxruntime inference of the same model — all measured in this process, on one
core (OMP/BLAS threads pinned to 1 before numpy is imported).

Targets: fep_tight at least 100× below fep_paper on the ResNet sample; bound under 5 s.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from robaudit.bounds.audit import BoundOptions, compute_bound, load_network  # noqa: E402
from robaudit.graph.network import NetworkOptions  # noqa: E402

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
CASES = [("lenet.onnx", 2), ("resnet_small.onnx", 2), ("mobilenet_se.onnx", 2)]


def best_of(function, repeats: int = 3) -> float:
    """Smallest wall time of ``repeats`` calls, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def one_inference_seconds(path: Path, shape: tuple[int, ...]) -> float:
    """Wall time of one onnxruntime run (batch 1) on one thread, session already created."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).random(shape, dtype=np.float32)}
    session.run(None, feed)
    return best_of(lambda: session.run(None, feed), repeats=20)


def worst_measured(path: Path, crashed: int) -> float | None:
    """Worst error found by ``inject --search worst`` for the same failures, if inject exists."""
    try:
        from robaudit.injection.campaign import run_injection  # noqa: F401
        from robaudit.injection.results import InjectOptions  # noqa: F401
    except ImportError:
        return None
    from robaudit.bounds.audit import model_info
    from robaudit.bounds.fep import FailureModel

    loaded, network = load_network(path, NetworkOptions())
    options = InjectOptions(failure=FailureModel.crash(), failures=(crashed,), search="worst", samples=32, seed=0)
    result = run_injection(network, options, model_info(loaded))
    return max(vector.measured.max for vector in result.vectors)


def main() -> None:
    print(f"{'model':<20} {'f/layer':>7} {'fep_paper':>11} {'fep_tight':>10} {'paper/tight':>11} "
          f"{'tight/measured':>14} {'bound s':>8} {'1 inference s':>13} {'ratio':>8}")
    for name, crashed in CASES:
        path = SAMPLES / name
        options = BoundOptions(epsilon=1.0, failures=(crashed,))
        result = compute_bound(path, options)
        seconds = best_of(lambda p=path, o=options: compute_bound(p, o), repeats=3)
        inference = one_inference_seconds(path, (1,) + tuple(result.settings.input_shape[1:]))
        measured = worst_measured(path, crashed)
        over = f"{result.fep_tight / measured:14.1f}" if measured else f"{'n/a':>14}"
        print(f"{name:<20} {crashed:>7} {result.fep_paper:11.4g} {result.fep_tight:10.4g} "
              f"{result.fep_paper / result.fep_tight:11.1f} {over} {seconds:8.3f} {inference:13.6f} "
              f"{seconds / inference:8.0f}")
        if name.startswith("resnet"):
            assert result.fep_paper / result.fep_tight >= 100, "tight bound must be ≥100× below paper on ResNet"
            assert seconds < 5.0, "bound --method tight must take under 5 s on the ResNet sample"


if __name__ == "__main__":
    main()
