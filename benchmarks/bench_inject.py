"""Benchmark: how fast is ``robaudit inject``?

All figures are (fault configuration × input) evaluations per second, measured in this
process on the same machine, interleaved and repeated (median of ``--repeats``):

* plain onnxruntime inference of ``lenet.onnx`` on the 200 held-out inputs (one run of
  batch 200, onnxruntime's default threads) — inputs per second; also on batches of
  800 (the inputs 4 times, about the rows robaudit puts in one run); the ratios use
  the faster of the two;
* robaudit's evaluator, as ``inject`` runs it (contained child process), on a campaign
  of random crash sets (2 neurons) in LeNet's first hidden layer (``features.0``) and
  in its last (``classifier.3``), every set on the same 200 inputs;
* PyTorchFI 0.6.0 on a torch LeNet holding the same weights (read from the ONNX
  initializers), on the same fault sets and inputs: one ``declare_neuron_fi`` per fault
  set with the 200 inputs as its batch (its hooks set the Conv2d/Linear output; the
  ReLU after it maps the crash value 0 to 0, as a crash after the ReLU does). Its
  errors are checked against robaudit's.

Targets (README "Speed"): first hidden layer ≥ 0.7× plain inference; last hidden layer > 1×;
≥ 3× PyTorchFI. Also printed: the in-process evaluator (no containment) and the
start-up cost of the child process. Exit code 1 when a target is missed
(``--no-check`` to only print).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from robaudit.bounds.audit import load_network
from robaudit.graph.network import NetworkOptions
from robaudit.injection.instrument import FaultBatch, instrument, neuron_site
from robaudit.injection.sandbox import Limits, open_evaluator

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
LENET = SAMPLES / "lenet.onnx"
FAILED = 2  # crashed neurons per fault set


def rate(function, count: int, min_seconds: float) -> float:
    """count / seconds per call of ``function``, calling it for at least ``min_seconds``."""
    function()
    calls, start = 0, time.perf_counter()
    while True:
        function()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return calls * count / elapsed


def fault_sets(neurons: int, configs: int, seed: int) -> np.ndarray:
    """[configs, FAILED] distinct neuron indices per set."""
    rng = np.random.default_rng(seed)
    return np.stack([np.sort(rng.choice(neurons, FAILED, replace=False)) for _ in range(configs)])


# --------------------------------------------------------------------------- PyTorchFI


def torch_lenet():
    """The LeNet of sample_models/make_lenet.py with the weights of lenet.onnx."""
    import torch

    sys.path.insert(0, str(SAMPLES))
    from make_lenet import LeNet

    model = LeNet().eval()
    initializers = onnx.load(str(LENET)).graph.initializer
    model.load_state_dict({t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in initializers})
    return model


class PyTorchFICampaign:
    """PyTorchFI on the same fault sets: ``per_set`` sets per ``declare_neuron_fi``.

    The batch is ``per_set`` copies of the inputs; row r of copy c carries fault set c
    (PyTorchFI injects per batch element). ``per_set`` = 1 is its textbook use, one
    corrupted model per fault set; larger values amortize its model copy over more rows.
    """

    def __init__(self, model, x: np.ndarray, layer_type, layer_num: int, shape: tuple[int, ...], per_set: int):
        import torch
        from pytorchfi.core import fault_injection

        self.torch, self.per_set = torch, per_set
        self.x = torch.from_numpy(np.tile(x, (per_set,) + (1,) * (x.ndim - 1)))
        self.inputs = len(x)
        self.pfi = fault_injection(
            model, batch_size=len(self.x), input_shape=list(x.shape[1:]), layer_types=[layer_type], use_cuda=False
        )
        self.layer_num, self.shape = layer_num, shape
        with torch.no_grad():
            self.clean = model(self.x)

    def errors(self, sets: np.ndarray) -> np.ndarray:
        """err per (set, input): max |F̃ − F| over the logits; len(sets) a multiple of per_set."""
        out = []
        for start in range(0, len(sets), self.per_set):
            group = sets[start : start + self.per_set]
            rows = np.repeat(np.arange(len(group) * self.inputs), group.shape[1])
            ids = np.repeat(group, self.inputs, axis=0).reshape(-1)
            coords = [c.tolist() for c in np.unravel_index(ids, self.shape)]
            coords += [[None] * len(ids)] * (3 - len(coords))
            corrupted = self.pfi.declare_neuron_fi(
                batch=rows.tolist(),
                layer_num=[self.layer_num] * len(ids),
                dim1=coords[0],
                dim2=coords[1],
                dim3=coords[2],
                value=[0.0] * len(ids),
            )
            with self.torch.no_grad():
                err = (corrupted(self.x) - self.clean).abs().amax(dim=1).numpy()
            out.append(err.reshape(self.per_set, self.inputs)[: len(group)])
        return np.concatenate(out)


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=64, help="fault sets per robaudit measurement")
    parser.add_argument("--pytorchfi-configs", type=int, default=8, help="fault sets per PyTorchFI measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.0, help="minimum time per measurement")
    parser.add_argument("--no-check", action="store_true", help="print only; exit 0 even when a target is missed")
    args = parser.parse_args()

    import torch
    from torch import nn

    x = np.load(SAMPLES / "lenet_inputs.npz")["x"]
    loaded, network = load_network(LENET, NetworkOptions())
    hidden = network.hidden_layers
    first, last = 0, len(hidden) - 1
    plain = ort.InferenceSession(str(LENET), providers=["CPUExecutionProvider"])
    model = torch_lenet()
    print(
        f"machine: onnxruntime {ort.__version__} (default threads), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); {len(x)} inputs, {FAILED} crashed neurons per fault set"
    )

    cases = {}
    for label, index, layer_type, layer_num in (("first", first, nn.Conv2d, 0), ("last", last, nn.Linear, 1)):
        layer = hidden[index]
        spec = instrument(network, (neuron_site(layer, index),), loaded.opset)
        sets = fault_sets(layer.neurons, args.configs, seed=index)
        batch = FaultBatch(len(sets), {0: (sets, np.zeros(sets.shape))})
        start = time.perf_counter()
        isolated = open_evaluator(spec, x, Limits(), isolate=True)
        startup = time.perf_counter() - start
        start = time.perf_counter()
        local = open_evaluator(spec, x, Limits(), isolate=False)
        local_startup = time.perf_counter() - start
        shape = tuple(layer.out_shape[1:])
        pfis = [PyTorchFICampaign(model, x, layer_type, layer_num, shape, k) for k in (1, args.pytorchfi_configs)]
        few = sets[: args.pytorchfi_configs]
        ours = isolated.evaluate(FaultBatch(len(few), {0: (few, np.zeros(few.shape))})).errors
        agreement = max(float(np.abs(ours - pfi.errors(few)).max()) for pfi in pfis)
        assert agreement < 1e-3, f"PyTorchFI and robaudit disagree by {agreement} on the same fault sets"
        cases[label] = (layer, batch, isolated, local, pfis, few, startup, local_startup, agreement)

    samples: dict[str, list[float]] = {}
    x_torch = torch.from_numpy(x)
    x800 = np.tile(x, (4, 1, 1, 1))

    def torch_forward():
        with torch.no_grad():
            model(x_torch)

    for _ in range(args.repeats):
        measured = {"plain": rate(lambda: plain.run(None, {"input": x}), len(x), args.seconds)}
        measured["plain800"] = rate(lambda: plain.run(None, {"input": x800}), len(x800), args.seconds)
        measured["torch"] = rate(torch_forward, len(x), args.seconds)
        for label, (_, batch, isolated, local, pfis, few, *_rest) in cases.items():
            evals = batch.count * len(x)
            measured[f"{label}/robaudit"] = rate(lambda e=isolated, b=batch: e.evaluate(b), evals, args.seconds)
            measured[f"{label}/in-process"] = rate(lambda e=local, b=batch: e.evaluate(b), evals, args.seconds)
            for pfi in pfis:
                key = f"{label}/pytorchfi{pfi.per_set}"
                measured[key] = rate(lambda p=pfi, f=few: p.errors(f), len(few) * len(x), args.seconds)
        for key, value in measured.items():
            samples.setdefault(key, []).append(value)
    median = {key: statistics.median(values) for key, values in samples.items()}

    baseline = max(median["plain"], median["plain800"])
    print(
        f"\nplain onnxruntime inference: {median['plain']:12,.0f} inputs/s (batch 200), "
        f"{median['plain800']:,.0f} (batch 800)"
    )
    print(f"plain torch forward:         {median['torch']:12,.0f} inputs/s (no injection, for reference)")
    missed = []
    for label, (layer, _, isolated, _, pfis, _, startup, local_startup, agreement) in cases.items():
        ours, inproc = median[f"{label}/robaudit"], median[f"{label}/in-process"]
        per_set = {pfi.per_set: median[f"{label}/pytorchfi{pfi.per_set}"] for pfi in pfis}
        theirs = max(per_set.values())
        vs_plain, vs_pfi = ours / baseline, ours / theirs
        target = 0.7 if label == "first" else 1.0
        ok_plain = vs_plain >= target if label == "first" else vs_plain > target
        print(f"\n{label} hidden layer '{layer.name}' ({layer.neurons} neurons), evaluations/s:")
        print(
            f"  robaudit (child process)   {ours:12,.0f}   {vs_plain:6.2f}× plain  "
            f"(target {'≥' if label == 'first' else '>'} {target})  {'PASS' if ok_plain else 'MISS'}"
        )
        print(f"  robaudit (in-process)      {inproc:12,.0f}   {inproc / baseline:6.2f}× plain")
        for k, value in per_set.items():
            print(f"  PyTorchFI 0.6.0, {k:2d} set(s)/declare {value:9,.0f}")
        print(f"  robaudit / best PyTorchFI  {vs_pfi:12.1f}×  (target ≥ 3)  {'PASS' if vs_pfi >= 3 else 'MISS'}")
        print(
            f"  start-up: child process {startup:.2f} s, in-process {local_startup:.2f} s; "
            f"errors agree with PyTorchFI to {agreement:.1e}"
        )
        if not ok_plain:
            missed.append(f"{label} layer vs plain inference")
        if vs_pfi < 3:
            missed.append(f"{label} layer vs PyTorchFI")
        isolated.close()
    if missed:
        print("\nmissed: " + "; ".join(missed))
    return 1 if missed and not args.no_check else 0


if __name__ == "__main__":
    sys.exit(main())
