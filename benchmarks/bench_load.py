"""Speed of ``bound`` on a dense model of about 10 million weights, against a bare ``onnx.load``.

Issue 2's target: ``robaudit bound`` takes at most 1.5× the time of ``onnx.load`` of
the same file. Both are timed in this process on the same file (best of several
runs, so the page cache is warm for both); the script prints the times and the
ratio for ``--method paper`` and the default (tight) method, and, when a ratio is
above the target (or with ``--profile``), the functions where the time goes.

    .venv/bin/python benchmarks/bench_load.py [--repeat 5] [--profile] [--strict]

``--strict`` exits 1 when a ratio is above the target. BLAS is limited to one thread
(unless ``OPENBLAS_NUM_THREADS`` / ``OMP_NUM_THREADS`` are set) so that the numbers are
comparable with the single-threaded ``onnx.load`` and stable on a shared machine.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import pstats  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from robaudit.audit import BoundOptions, bound_network, compute_bound, model_info  # noqa: E402
from robaudit.loader import load_model  # noqa: E402
from robaudit.network import NetworkOptions, build_network  # noqa: E402
from robaudit.onnx_graph import build_graph  # noqa: E402

TARGET = 1.5
#: input → hidden → hidden → output: 2000·2500 + 2500·2000 + 2000·10 ≈ 10.02 million weights.
SIZES = (2000, 2500, 2000, 10)


def build_model(path: Path, sizes=SIZES, seed: int = 0) -> int:
    """Write a Gemm/ReLU chain with PyTorch's layout (B [out, in], transB=1); return its weight count."""
    rng = np.random.default_rng(seed)
    nodes, inits, current = [], [], "x"
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        scale = 1.0 / np.sqrt(n_in)
        inits.append(numpy_helper.from_array(rng.uniform(-scale, scale, (n_out, n_in)).astype(np.float32), f"W{i}"))
        inits.append(numpy_helper.from_array(rng.uniform(-scale, scale, n_out).astype(np.float32), f"b{i}"))
        nodes.append(helper.make_node("Gemm", [current, f"W{i}", f"b{i}"], [f"g{i}"], name=f"/fc{i}/Gemm", transB=1))
        current = f"g{i}"
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [current], [f"r{i}"], name=f"/act{i}/Relu"))
            current = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "dense10m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", sizes[0]])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["N", sizes[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def best_of(repeat: int, func) -> float:
    """Smallest wall time of ``repeat`` calls."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return min(times)


def profile(func, lines: int = 18) -> str:
    """cProfile of one call, the top functions by cumulative and by own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    func()
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).strip_dirs()
    stats.sort_stats("cumulative").print_stats(lines)
    stats.sort_stats("tottime").print_stats(lines)
    return out.getvalue()


def stages(path: Path, repeat: int) -> None:
    """Best time of each stage of ``compute_bound``, as a multiple of ``onnx.load``."""
    load = best_of(repeat, lambda: onnx.load(str(path)))
    loaded = load_model(path)
    graph = build_graph(loaded.proto)
    network = build_network(graph, NetworkOptions(), loaded.opset)
    parts = {
        "loader.load_model (read, sha256, parse)": lambda: load_model(path),
        "onnx_graph.build_graph (tensors to numpy)": lambda: build_graph(loaded.proto),
        "network.build_network (fold, IBP, layers)": lambda: build_network(graph, NetworkOptions(), loaded.opset),
    }
    for method in ("paper", "tight"):
        options = BoundOptions(epsilon=0.1, method=method, failures=(1,))
        parts[f"audit.bound_network --method {method}"] = lambda o=options: bound_network(
            network, o, model_info(loaded)
        )
    print("stages (best of each, × onnx.load):")
    for name, func in parts.items():
        seconds = best_of(repeat, func)
        print(f"  {name:45s} {seconds * 1e3:8.1f} ms  {seconds / load:5.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="always print the profile")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a ratio is above the target")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dense10m.onnx"
        weights = build_model(path)
        print(f"model: dense chain {SIZES}, {weights / 1e6:.2f} M weights, {path.stat().st_size / 2**20:.1f} MiB")
        load = best_of(args.repeat, lambda: onnx.load(str(path)))
        print(f"onnx.load                       {load * 1e3:8.1f} ms  (best of {args.repeat})")
        above = False
        for method in ("paper", "tight"):
            options = BoundOptions(epsilon=0.1, method=method, failures=(1,))
            bound = best_of(args.repeat, lambda options=options: compute_bound(path, options))
            ratio = bound / load
            verdict = "ok" if ratio <= TARGET else f"ABOVE the {TARGET}x target"
            print(f"compute_bound --method {method:6s} {bound * 1e3:8.1f} ms  ratio {ratio:5.2f}x  {verdict}")
            if ratio > TARGET or args.profile:
                above |= ratio > TARGET
                print(profile(lambda options=options: compute_bound(path, options)))
        stages(path, args.repeat)
    return 1 if (above and args.strict) else 0


if __name__ == "__main__":
    raise SystemExit(main())
