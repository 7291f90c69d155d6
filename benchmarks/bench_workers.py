"""Campaign throughput with ``--workers`` (and Ray): fault-set evaluations per second.

The campaign: random crash sets of one neuron in the first hidden layer (``stem.0``) of
``sample_models/resnet_small.onnx``, ``--trials`` sets (default 3,000) on ``--samples``
inputs drawn from the domain, as ``robaudit inject`` runs it (contained child processes).
Per configuration it prints

* the whole campaign's wall time (start-up of the onnxruntime children included) and
  fault sets per second over it;
* the steady-state rate: fault sets per second once the workers' onnxruntime sessions are
  ready (start-up excluded; drawing the sets, the pipes and the statistics included), the
  figure the workers scale;
* the speed-up against one worker and the efficiency against the ideal (workers × one worker);
* the ceiling the target meets: one worker already runs onnxruntime with a thread per core, so
  N one-thread workers can be at most N × (one-thread rate) / (one-worker rate) times faster.

Configurations: workers 1, 2 (and ``--ray``: Ray local with 2 actors, when Ray is installed),
interleaved over ``--repeats`` rounds, median reported. Every configuration's report must be
identical to the one-worker report (checked). Target: workers 2 ≥ 1.6× workers 1 (2 cores).
Exit 1 when missed (``--no-check`` only prints).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from unittest.mock import patch

from robaudit.bounds.audit import load_network, model_info
from robaudit.formats.report import report_dict
from robaudit.graph.network import NetworkOptions
from robaudit.injection import campaign as campaign_module
from robaudit.injection.campaign import failure_vector, run_injection
from robaudit.injection.results import InjectOptions
from robaudit.injection.workers import Runner, open_runner, usable_cores

RESNET = Path(__file__).resolve().parent.parent / "sample_models" / "resnet_small.onnx"
TARGET = 1.6


def campaign(runner: Runner, trials: int, samples: int) -> tuple[float, float, dict]:
    """(wall seconds, steady-state sets/s, report) of one campaign."""
    loaded, network = load_network(RESNET, NetworkOptions())
    counts = [1] + [0] * (len(network.hidden_layers) - 1)
    options = InjectOptions(
        vectors=(failure_vector(network, counts),), trials=trials, samples=samples, runner=runner, seed=0
    )
    ready: list[float] = []

    def timed_runner(*args, **kwargs):
        evaluator = open_runner(*args, **kwargs)
        ready.append(time.perf_counter())
        return evaluator

    start = time.perf_counter()
    with patch.object(campaign_module, "open_runner", timed_runner):
        result = run_injection(network, options, model_info(loaded))
    end = time.perf_counter()
    return end - start, trials / (end - ready[0]), report_dict(result)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=3000)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ray", action="store_true", help="also Ray local (2 actors)")
    parser.add_argument("--no-check", action="store_true")
    args = parser.parse_args()
    configs = {"workers 1": Runner(1), "workers 2": Runner(2), "workers 1, 1 thread": Runner(1, cores=1)}
    if args.ray:
        configs["ray local, 2 actors"] = Runner(2, backend="ray")
    walls: dict[str, list[float]] = {name: [] for name in configs}
    steadies: dict[str, list[float]] = {name: [] for name in configs}
    reference = None
    for _ in range(args.repeats):
        for name, runner in configs.items():
            wall, steady, report = campaign(runner, args.trials, args.samples)
            walls[name].append(wall)
            steadies[name].append(steady)
            reference = reference or report
            if report != reference:
                print(f"{name}: the report differs from the one-worker report", file=sys.stderr)
                return 1
    print(
        f"resnet_small.onnx, first hidden layer, {args.trials} random crash sets × {args.samples} inputs, "
        f"{usable_cores()} cores, median of {args.repeats}"
    )
    base_wall = statistics.median(walls["workers 1"])
    base = statistics.median(steadies["workers 1"])
    header = ("configuration", "wall s", "sets/s (wall)", "sets/s (steady)", "speed-up", "eff.")
    print("{:<22} {:>8} {:>14} {:>16} {:>9} {:>6}".format(*header))
    speedups = {}
    for name in configs:
        wall, steady = statistics.median(walls[name]), statistics.median(steadies[name])
        workers = configs[name].workers
        speedups[name] = steady / base
        print(
            f"{name:<22} {wall:8.2f} {args.trials / wall:14.0f} {steady:16.0f} {steady / base:8.2f}x "
            f"{steady / base / workers:6.0%}"
        )
    print(f"wall-clock speed-up of workers 2: {base_wall / statistics.median(walls['workers 2']):.2f}x")
    one_thread = statistics.median(steadies["workers 1, 1 thread"])
    print(
        f"onnxruntime's own threads: workers 1 runs {base / one_thread:.2f}x one thread; so two one-thread "
        f"workers can reach at most {2 * one_thread / base:.2f}x workers 1 (perfect scaling), and reach "
        f"{speedups['workers 2'] * base / (2 * one_thread):.0%} of that"
    )
    print("reports identical across configurations: yes")
    if not args.no_check and speedups["workers 2"] < TARGET:
        print(f"target missed: workers 2 is {speedups['workers 2']:.2f}x workers 1 (target ≥ {TARGET}x)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
