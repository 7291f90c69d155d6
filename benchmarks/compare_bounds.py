"""Are the numbers of ``bound`` unchanged by a change that only makes it faster?

``dump DIR`` writes, per model (every float model of ``sample_models/`` and the four deep nets
of ``deep_nets.py``, exported once with fixed seeds into ``--models`` so that two runs see the
same weights), an ``.npz`` with what the reports and the inverse problems read from the
tight bound: per-layer ``max_failures`` (tight and paper), the uniform and total counts,
``fep_tight`` of several failure vectors, and the per-output bounds of those vectors and of
each layer failing alone (1 and 3 neurons) — and the CPU seconds of the whole computation.

``diff OLD NEW`` compares two dumps array by array: identical, within a few ulps (relative
difference ≤ 1e-12, printed), or different; a bound that got looser (or a count that got
smaller) beyond 1e-12 relative is flagged ``LOOSER`` and the exit status is 1.

Run (from the repository root, one thread):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compare_bounds.py dump /tmp/before
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compare_bounds.py dump /tmp/after
    .venv/bin/python benchmarks/compare_bounds.py diff /tmp/before /tmp/after

``time OLD_TREE`` times ``bound --crash 1`` on the four deep nets with the code of ``OLD_TREE``
(``git archive COMMIT | tar -x -C OLD_TREE``) and of this checkout, alternately:

    .venv/bin/python benchmarks/compare_bounds.py time /tmp/old --repeat 5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

#: sample models that ``bound`` takes with its defaults (the others need inputs or tokens).
SAMPLES = (
    "paper_mlp_sigmoid",
    "digits_mlp",
    "lenet",
    "resnet_small",
    "resnet_small_bn",
    "digits_cnn",
    "digits_cnn_int8",
    "mobilenet_se",
    "encoder",
)


def export_deep(directory: Path) -> dict[str, Path]:
    """The four deep nets as ONNX in ``directory`` (exported once; fixed seeds)."""
    import torch
    from deep_nets import DEEP

    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (builder, shape) in DEEP.items():
        path = directory / f"{name}.onnx"
        if not path.exists():
            torch.manual_seed(1)
            model = builder().eval()
            torch.onnx.export(
                model,
                (torch.rand(shape),),
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=["input"],
                output_names=["out"],
            )
        paths[name] = path
    return paths


def measure(path: Path) -> dict[str, np.ndarray]:
    """The figures of one model (see the module docstring)."""
    from robaudit.bounds.audit import load_network
    from robaudit.bounds.bound import make_bounds
    from robaudit.bounds.fep import Analysis, FailureModel
    from robaudit.graph.network import NetworkOptions

    start = time.process_time()
    _, network = load_network(path, NetworkOptions())
    analysis = Analysis(network, FailureModel.crash())
    paper, tight = make_bounds(analysis)
    hidden = analysis.hidden
    count = len(hidden)
    out: dict[str, np.ndarray] = {}
    for eps in (1.0, 1e3):
        out[f"max_single_tight_{eps:g}"] = np.array(
            [tight.max_single(i, la.neurons, eps) for i, la in enumerate(hidden)]
        )
        out[f"max_single_paper_{eps:g}"] = np.array(
            [paper.max_single(i, la.neurons, eps) for i, la in enumerate(hidden)]
        )
        out[f"max_uniform_{eps:g}"] = np.array([tight.max_uniform(eps)])
        out[f"max_total_{eps:g}"] = np.array([tight.max_total(eps)[0]])
    sensitivity = tight.tight
    for f in (1, 3):
        out[f"fep_tight_uniform_{f}"] = np.array([tight.fep([f] * count)])
        out[f"per_output_uniform_{f}"] = sensitivity.per_output([f] * count)
        alone = []
        for i in range(count):
            vector = [0] * count
            vector[i] = f
            alone.append(sensitivity.per_output(vector))
        out[f"per_output_alone_{f}"] = np.stack(alone)
    out["total_curve"] = sensitivity.total_curve(min(64, sum(la.neurons for la in hidden)))
    out["neuron_max"] = np.concatenate([m.reshape(-1) for m in sensitivity.neuron_max])
    out["seconds"] = np.array([time.process_time() - start])
    return out


def dump(directory: Path, models: Path, only: list[str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    paths = {name: ROOT / "sample_models" / f"{name}.onnx" for name in SAMPLES}
    paths.update(export_deep(models))
    for name, path in paths.items():
        if only and name not in only:
            continue
        figures = measure(path)
        np.savez(directory / f"{name}.npz", **figures)
        print(f"{name:<24} {figures['seconds'][0]:7.2f} s  fep_tight(1 each) {figures['fep_tight_uniform_1'][0]:.6g}")


def diff(old: Path, new: Path) -> int:
    status = 0
    for before_path in sorted(old.glob("*.npz")):
        after_path = new / before_path.name
        if not after_path.exists():
            print(f"{before_path.stem}: missing in {new}")
            continue
        before, after = np.load(before_path), np.load(after_path)
        notes = []
        for key in before.files:
            if key == "seconds":
                continue
            a, b = before[key].astype(np.float64), after[key].astype(np.float64)
            if a.shape != b.shape:
                notes.append(f"{key}: shape {a.shape} -> {b.shape}")
                status = 1
                continue
            if np.array_equal(a, b, equal_nan=True):
                continue
            with np.errstate(invalid="ignore", divide="ignore"):
                rel = np.abs(b - a) / np.maximum(np.abs(a), np.finfo(float).tiny)
            rel = np.where(a == b, 0.0, rel)
            worst = float(np.nanmax(rel))
            counts = key.startswith("max_")
            looser = np.any(b < a) if counts else np.any((b - a) > 1e-12 * np.abs(a))
            tag = "LOOSER" if looser else ("ulps" if worst <= 1e-12 else "tighter")
            if looser:
                status = 1
            notes.append(f"{key}: {tag} ({int(np.sum(a != b))} of {a.size} differ, max rel {worst:.2e})")
        seconds = f"{float(before['seconds'][0]):.2f} s -> {float(after['seconds'][0]):.2f} s"
        print(f"{before_path.stem:<24} {seconds:<22} " + ("identical" if not notes else "; ".join(notes)))
    return status


def timing(old_tree: Path, models: Path, repeat: int) -> None:
    """CPU seconds of ``bound --crash 1`` on each deep net, the code of ``old_tree`` (a source tree with
    ``robaudit/``, e.g. from ``git archive``) and of this checkout run alternately in child
    processes (one thread), ``repeat`` times each: the least and the median. On a shared
    machine alternating keeps both sides under the same load."""
    import os
    import statistics
    import subprocess

    code = (
        "import sys, time\n"
        "import robaudit\n"
        "assert robaudit.__file__.startswith(sys.argv[2]), robaudit.__file__\n"
        "from robaudit.bounds.audit import BoundOptions, compute_bound\n"
        "t = time.process_time()\n"
        "r = compute_bound(sys.argv[1], BoundOptions(epsilon=1.0, failures=(1,)))\n"
        "print(time.process_time() - t, r.fep_tight)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    trees = {"old": str(old_tree.resolve()), "new": str(ROOT)}
    for name, path in export_deep(models).items():
        seconds: dict[str, list[float]] = {"old": [], "new": []}
        bounds = {}
        for _ in range(repeat):
            for side, tree in trees.items():
                run = subprocess.run(
                    [sys.executable, "-c", code, str(path), tree],
                    env={**env, "PYTHONPATH": tree},
                    cwd=tree,  # the working directory comes first on sys.path
                    capture_output=True,
                    text=True,
                    check=True,
                )
                spent, bound = run.stdout.split()
                seconds[side].append(float(spent))
                bounds[side] = bound
        least = {side: min(v) for side, v in seconds.items()}
        middle = {side: statistics.median(v) for side, v in seconds.items()}
        print(
            f"{name:<22} old {least['old']:6.2f} s (median {middle['old']:6.2f})  new {least['new']:6.2f} s "
            f"(median {middle['new']:6.2f})  {least['old'] / least['new']:4.2f}× faster  "
            f"fep_tight {bounds['old']} -> {bounds['new']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dump")
    d.add_argument("directory", type=Path)
    d.add_argument("--models", type=Path, default=Path("/tmp/robaudit_deep_models"))
    d.add_argument("--only", nargs="*", default=[])
    c = sub.add_parser("diff")
    c.add_argument("old", type=Path)
    c.add_argument("new", type=Path)
    t = sub.add_parser("time")
    t.add_argument("old_tree", type=Path)
    t.add_argument("--models", type=Path, default=Path("/tmp/robaudit_deep_models"))
    t.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.command == "dump":
        dump(args.directory, args.models, args.only)
    elif args.command == "time":
        timing(args.old_tree, args.models, args.repeat)
    else:
        sys.exit(diff(args.old, args.new))


if __name__ == "__main__":
    main()
