"""How tight is ``fep_tight`` on trained networks, and what does ``bound`` cost on deep ones?

Part 1 (``--part tight``): networks trained here in seconds on scikit-learn's digits
(``benchmarks/trained_nets.py``: three MLPs, an MLP with Tanh, a CNN with BatchNorm, an
overlapping max-pool, a BatchNorm after an activation and a Tanh layer, a small ResNet,
an SE block). For several failure vectors it prints ``fep_tight`` (with the per-neuron
slopes, docs/method.md §4.3), the same bound with the global constants K (the baseline,
computed in this run), and the worst error a strong torch attack finds (failure sets,
byzantine values and the input searched together, ``trained_nets.attack``), then the
median ratio ``fep_tight / worst found`` per kind and the largest. On the ReLU networks (the
MLPs with ReLU, the small ResNet) the attack's best point is then made exact
(``exact_search.polish``: its failure set kept, a linear program over its activation region and
steps to neighbouring regions while they gain, at most ``EXACT_SECONDS`` per vector); the
Where ``fep_tight / worst found`` is still above ``REFINE_ABOVE`` (10) the search goes on
from the best point so far (``trained_nets.refine_witness``: a population of relaxed starts,
every exchange of a failed neuron for a healthy one of its layer, an iterated local search;
on the ReLU nets its answer made exact again): where a weak attack would make the bound look
loose, the search works hardest (in the runs so far: the small ResNet's vectors only). The
column ``by`` says which stage found the worst (``attack``, ``lp``, ``ls`` = the refinement,
``ls+lp`` = the refinement made exact), ``lp s`` and ``ls s`` the seconds of the exact stages
and of the refinement. Every error printed is that of a torch float64 forward pass.

Part 2 (``--part deep``): wall time and peak memory (the VmHWM high-water mark of a child process) of
``robaudit bound`` beside one onnxruntime inference process of the same model, on
approximate ResNet-18 (1000 classes, 32×32), U-Net (64×64 image out), MobileNetV3-Small
and EfficientNet-B0 (64×64) built here in plain torch with random weights (the
architectures are approximations: same stages, widths and block types, not the
torchvision graphs). Two comparisons: CPU seconds of one-thread processes (robaudit's tight pass
and onnxruntime each on one thread: what each costs, steadier on a shared machine), and wall seconds
with every core the process may use (robaudit's pass in ``ROBAUDIT_THREADS`` = cores threads,
onnxruntime with its default thread pool: what a user waits for); the threaded bound must print the
same result.

Targets: ratio ≤ 1.8 median on MLPs, ≤ 5 median on CNNs, ≤ 50 everywhere; deep
nets ≤ 2 GiB peak and ≤ 10× one inference process.

Run: ``.venv/bin/python benchmarks/bench_trained.py [--part tight|deep|all] [--repeat N]`` (``--repeat``: each
process of the deep part N times, the least time kept — on a shared machine the others only add).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import exact_search  # noqa: E402
from trained_nets import (  # noqa: E402
    NETWORKS,
    AttackOptions,
    RefineOptions,
    Witness,
    attack_witness,
    digits,
    refine_witness,
    sites,
    trained,
)

from robaudit.bounds.audit import BoundOptions, bound_network, load_network, model_info  # noqa: E402
from robaudit.bounds.fep import Analysis, FailureModel  # noqa: E402
from robaudit.bounds.tight import TightBound  # noqa: E402
from robaudit.graph.network import NetworkOptions  # noqa: E402
from robaudit.limits import usable_cores  # noqa: E402


def vectors(layers: int) -> list[tuple[str, list[int], FailureModel]]:
    """The failure vectors measured per network."""
    out = [
        ("crash 1 each", [1] * layers, FailureModel.crash()),
        ("crash 3 each", [3] * layers, FailureModel.crash()),
        ("byz C=1, 1 each", [1] * layers, FailureModel.byzantine(1.0)),
    ]
    for i in range(layers):
        out.append((f"crash 4 in l{i + 1}", [4 if j == i else 0 for j in range(layers)], FailureModel.crash()))
    return out


#: seconds the exact stage may take per failure vector, and its steps to neighbouring regions
EXACT_SECONDS, EXACT_ROUNDS = 15.0, 20
#: the refinement (``trained_nets.refine_witness``) runs where fep_tight / worst found is still above this
REFINE_ABOVE = 10.0


def _exact_stage(model, graph, counts: list[int], c: float, witness) -> exact_search.Found:
    """The attack's best point made exact (``exact_search.polish``): its failure set kept, the input and
    sent values maximised by a linear program over its activation region, then over neighbouring
    regions while that gains; every answer checked by a torch float64 forward pass."""
    x = witness.x.numpy().reshape(-1)
    masks = [m.numpy().reshape(-1) for m in witness.masks]
    values = [v.numpy().reshape(-1) for v in witness.values]
    # the output and sign of the witness's error (the attack pushed ``witness.target``; another may lead)
    change = exact_search.forward(graph, x, masks, values)[-1] - exact_search.forward(graph, x)[-1]
    output = int(np.abs(change).argmax())
    return exact_search.polish(model, graph, counts, c, output, float(np.sign(change[output]) or 1.0), x, masks,
                               values, free=0, time_limit=EXACT_SECONDS, rounds=EXACT_ROUNDS)


def _as_witness(found: exact_search.Found, like: Witness) -> Witness:
    """The exact stage's answer as a witness (flat [1, N] masks and values, x shaped as ``like.x``)."""
    assert found.x is not None and found.masks is not None and found.values is not None and found.error is not None
    return Witness(found.error, like.target, like.sign, torch.from_numpy(found.x).reshape(like.x.shape),
                   [torch.from_numpy(m).reshape(1, -1) for m in found.masks],
                   [torch.from_numpy(v).reshape(1, -1) for v in found.values])


def worst_found(model, graph, counts: list[int], failure: FailureModel, data: np.ndarray, targets: list[int],
                bound: float) -> tuple[Witness, str, float, float, float]:
    """The benchmark's search for one failure vector: (the worst point found, the stage that found it, attack s,
    exact s, refinement s). The attack (``trained_nets.attack_witness``); on ReLU networks its best
    point made exact (:func:`_exact_stage`); where ``bound`` / worst is still above
    :data:`REFINE_ABOVE`, the refinement from the best so far (``trained_nets.refine_witness``:
    a population of relaxed starts, exchanges of failed neurons, an iterated local search), its answer
    made exact again on ReLU networks. Each stage starts from the previous best, so none loses;
    every error is that of a torch float64 forward pass."""
    start = time.perf_counter()
    witness = attack_witness(model, counts, failure.failure_range, (0.0, 1.0), data, targets, AttackOptions())
    attack_seconds, exact_seconds, refine_seconds = time.perf_counter() - start, 0.0, 0.0
    stage = "attack"
    c = failure.failure_range[1]
    if graph is not None:
        found = _exact_stage(model, graph, counts, c, witness)
        exact_seconds += found.seconds
        if found.error is not None and found.error > witness.error:
            witness, stage = _as_witness(found, witness), "lp"
    if witness.error > 0 and bound / witness.error <= REFINE_ABOVE:
        return witness, stage, attack_seconds, exact_seconds, refine_seconds
    start = time.perf_counter()
    refined = refine_witness(model, counts, failure.failure_range, (0.0, 1.0), data, witness, RefineOptions())
    refine_seconds = time.perf_counter() - start
    if refined is witness:
        return witness, stage, attack_seconds, exact_seconds, refine_seconds
    witness, stage = refined, "ls"
    if graph is not None:
        found = _exact_stage(model, graph, counts, c, refined)
        exact_seconds += found.seconds
        if found.error is not None and found.error > witness.error:
            witness, stage = _as_witness(found, witness), "ls+lp"
    return witness, stage, attack_seconds, exact_seconds, refine_seconds


def tight_part(directory: Path) -> None:
    images, _ = digits()
    data = images[:1500].astype(np.float64)
    print(f"{'network':<16} {'acc':>5} {'failures':<18} {'fep_paper':>10} {'tight(K)':>10} {'fep_tight':>10} "
          f"{'worst':>10} {'tight/worst':>11} {'K/worst':>9} {'attack s':>8} {'lp s':>6} {'ls s':>6} {'by':>6}")
    ratios: dict[str, list[float]] = {"mlp": [], "cnn": []}
    baseline: dict[str, list[float]] = {"mlp": [], "cnn": []}
    for name, (_, kind) in NETWORKS.items():
        model, path, accuracy = trained(name, directory)
        loaded, network = load_network(path, NetworkOptions())
        sizes = [la.neurons for la in network.hidden_layers]
        with torch.no_grad():
            model(torch.zeros(1, 1, 8, 8))
        expected = [int(np.prod(s.seen.shape[1:])) for s in sites(model)]
        assert sizes == expected, (name, sizes, expected)
        graph = exact_search.extract(model) if exact_search.supported(model) else None
        for label, counts, failure in vectors(len(sizes)):
            result = bound_network(network, BoundOptions(epsilon=1.0, failure=failure, failures=tuple(counts)),
                                   model_info(loaded))
            analysis = Analysis(network, failure)
            global_k = TightBound(analysis, use_ranges=False).fep(counts)
            per_output = TightBound(analysis).per_output(counts)
            targets = [int(k) for k in np.argsort(-per_output)[:3]]
            found, stage, seconds, exact_seconds, refine_seconds = worst_found(
                model, graph, counts, failure, data, targets, result.fep_tight)
            worst = found.error
            ratio = result.fep_tight / worst if worst > 0 else float("inf")
            base = min(global_k, result.fep_paper) / worst if worst > 0 else float("inf")
            if worst > result.fep_tight * (1 + 1e-5) + 1e-6:
                print(f"!!! VIOLATION {name} {label}: found {worst} > bound {result.fep_tight}")
            ratios[kind].append(ratio)
            baseline[kind].append(base)
            print(f"{name:<16} {accuracy:5.2f} {label:<18} {result.fep_paper:10.4g} {global_k:10.4g} "
                  f"{result.fep_tight:10.4g} {worst:10.4g} {ratio:11.2f} {base:9.2f} {seconds:8.1f} "
                  f"{exact_seconds:6.1f} {refine_seconds:6.1f} {stage:>6}")
    for kind, values in ratios.items():
        print(f"{kind}: median fep_tight/worst {statistics.median(values):.2f} (global-K baseline "
              f"{statistics.median(baseline[kind]):.2f}), max {max(values):.2f} over {len(values)} vectors")
    every = ratios["mlp"] + ratios["cnn"]
    print(f"all: max fep_tight/worst {max(every):.2f} (global-K baseline {max(baseline['mlp'] + baseline['cnn']):.2f})")


# --------------------------------------------------------------------------- deep nets


def _measure(code: str, threads: int = 1) -> tuple[float, float, float, str]:
    """(wall s, CPU s (user + system), peak RSS GiB, stdout) of ``python -c code`` in a child process
    (the peak is the child's own high-water mark, which it prints last: :func:`_peak_wrapper`).

    On a shared machine the wall time mostly measures the other processes; the CPU time
    is what the command itself costs (OMP/BLAS pinned to one thread, as the command line does;
    ``threads``: robaudit's tight pass, ``ROBAUDIT_THREADS``).
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "ROBAUDIT_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", _peak_wrapper(code)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime - _measure.spent
    _measure.spent = usage.ru_utime + usage.ru_stime
    peak = _reported_peak(out)
    if proc.returncode != 0:
        return wall, cpu, peak, "FAILED: " + err.strip().splitlines()[-1]
    return wall, cpu, peak, out.strip()


_measure.spent = 0.0  # type: ignore[attr-defined]


def _peak_wrapper(code: str) -> str:
    """``code`` followed by a last line 'peak_gib X': this process's peak resident memory, VmHWM of
    /proc/self/status (its own address space's high-water mark; ru_maxrss would not do: Linux carries it
    across exec, so a child started from this benchmark, which holds torch and the trained nets, reports
    at least the benchmark's own size)."""
    return code + (
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
        "print('peak_gib', int(hwm) / 2**20)\n"
    )


def _reported_peak(out: str) -> float:
    lines = [line for line in out.splitlines() if line.startswith("peak_gib")]
    return float(lines[-1].split()[1]) if lines else float("nan")


def _least(code: str, repeat: int, threads: int = 1) -> tuple[float, float, float, str]:
    """:func:`_measure` ``repeat`` times: the least wall and CPU time (what other processes on a
    shared machine add only ever lengthens them), the largest peak."""
    runs = [_measure(code, threads) for _ in range(max(1, repeat))]
    return min(r[0] for r in runs), min(r[1] for r in runs), max(r[2] for r in runs), runs[-1][3]


def deep_part(directory: Path, repeat: int = 1) -> None:
    from deep_nets import DEEP

    cores = usable_cores()
    print(f"{'model':<22} {'outputs':>7} {'bound s':>8} {'wall s':>8} {'peak GiB':>8} {'ort s':>6} {'ort GiB':>7} "
          f"{'time ×':>7} {'mem ×':>6} {'wall×' + str(cores):>7} {'ort wall':>8} {'×':>5}  result   "
          f"(s: CPU seconds of one-thread processes; wall×{cores}: wall s of bound with {cores} threads, "
          f"ort wall: of onnxruntime with its default threads)")
    for name, (builder, shape) in DEEP.items():
        path = directory / f"{name}.onnx"
        torch.manual_seed(1)  # the same weights in every run (before/after comparisons see the same bounds)
        model = builder().eval()
        torch.onnx.export(model, (torch.rand(shape),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["out"])
        bound_code = (
            "from robaudit.cli.process import retain_freed_memory\n"
            "retain_freed_memory()  # as the command does\n"
            "try:\n"
            "    from robaudit.cli.process import serve_large_blocks_from_heap\n"
            "    serve_large_blocks_from_heap()  # as the console script does\n"
            "except ImportError:  # code before it\n"
            "    pass\n"
            "from robaudit.bounds.audit import BoundOptions, compute_bound\n"
            f"r = compute_bound({str(path)!r}, BoundOptions(epsilon=1.0, failures=(1,)))\n"
            "print(f'fep_tight {r.fep_tight:.3g} paper {r.fep_paper:.3g} notes {list(r.notes)}')\n"
        )
        ort_code = (
            "import numpy as np, onnxruntime as ort\n"
            "o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.inter_op_num_threads = 1\n"
            f"s = ort.InferenceSession({str(path)!r}, o, providers=['CPUExecutionProvider'])\n"
            f"print(s.run(None, {{'input': np.random.rand{shape}.astype(np.float32)}})[0].shape)\n"
        )
        ort_default = ort_code.replace("o.intra_op_num_threads = 1; o.inter_op_num_threads = 1", "")
        b_wall, b_cpu, b_mem, b_out = _least(bound_code, repeat)
        o_wall, o_cpu, o_mem, _ = _least(ort_code, repeat)
        t_wall, _, _, t_out = _least(bound_code, repeat, threads=cores)
        d_wall, _, _, _ = _least(ort_default, repeat)
        outputs = int(np.prod(model(torch.rand(shape)).shape[1:]))
        same = "" if t_out.splitlines()[0] == b_out.splitlines()[0] else "  THREADED RESULT DIFFERS: " + t_out
        print(f"{name:<22} {outputs:>7} {b_cpu:8.2f} {b_wall:8.1f} {b_mem:8.2f} {o_cpu:6.2f} {o_mem:7.2f} "
              f"{b_cpu / o_cpu:7.1f} {b_mem / o_mem:6.1f} {t_wall:7.2f} {d_wall:8.2f} {t_wall / d_wall:5.1f}  "
              f"{b_out.splitlines()[0]}{same}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["tight", "deep", "all"], default="all")
    parser.add_argument("--repeat", type=int, default=1, help="deep part: each process N times, the least time kept")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("tight", "all"):
            tight_part(Path(tmp))
        if args.part in ("deep", "all"):
            deep_part(Path(tmp), args.repeat)


if __name__ == "__main__":
    main()
