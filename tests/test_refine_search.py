"""The benchmark's refinement stage (``benchmarks/trained_nets.refine_witness``: populations of
relaxed starts, exchanges of failed neurons screened in float32, an iterated local search)
against independent computations.

Whatever it reports must be a real error of the failure vector: the same failure set, sent
values and input replayed (a) through the numpy DAG of ``benchmarks/exact_search.extract``
(matrices read off the model by basis vectors, its own forward pass) and (b) through the
exported ONNX model in onnxruntime with the independent injector of ``tests/ort_faults.py``
give the same largest output change; the set has the vector's counts, the values lie in the
failure range, the input in the box. And it starts from the attack's witness, so it is never
below it. A weakened copy (a witness whose set was changed after its error was measured) is
caught by the same replay.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from exact_search import extract, forward  # noqa: E402
from ort_faults import FaultRunner  # noqa: E402
from trained_nets import (  # noqa: E402
    AttackOptions,
    RefineOptions,
    SmallResNet,
    Witness,
    attack_witness,
    export,
    refine_witness,
)

#: the ONNX values the legacy exporter gives the sites of ``SmallResNet`` (BatchNorm folded)
SITE_VALUES = ["/Relu_output_0", "/block1/Relu_output_0", "/block1/c2/Conv_output_0", "/block2/Relu_output_0",
               "/block2/c2/Conv_output_0"]
LIGHT = AttackOptions(starts=4, steps=6, swap_rounds=1, targets=1, candidates=2, settle=0)
REFINE = RefineOptions(starts=4, keep=1, rounds=2, steps=6, seconds=20.0)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """A random 2-channel ``SmallResNet`` with non-trivial BatchNorm statistics, its ONNX export,
    the numpy DAG, and the onnxruntime injector on its five sites."""
    torch.manual_seed(7)
    torch.set_num_threads(1)
    model = SmallResNet(channels=2)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.3, 0.3)
    path = export(model, tmp_path_factory.mktemp("refine") / "resnet.onnx")
    names = {o for node in onnx.load(path).graph.node for o in node.output}
    assert set(SITE_VALUES) <= names
    runner = FaultRunner(onnx.load(path), SITE_VALUES, [(2, 8, 8)] * 5)
    model = model.double().eval()
    return model, extract(model), runner


def replayed(resnet, witness: Witness) -> tuple[float, float]:
    """(numpy DAG, onnxruntime) largest |F̃_k − F_k| at the witness's input, set and values."""
    _, graph, runner = resnet
    x = witness.x.numpy().reshape(-1)
    masks = [m.numpy().reshape(-1) for m in witness.masks]
    values = [v.numpy().reshape(-1) for v in witness.values]
    dag = float(np.abs(forward(graph, x, masks, values)[-1] - forward(graph, x)[-1]).max())
    batch = x.reshape(1, 1, 8, 8)
    keeps = [(1.0 - m).reshape(1, 2, 8, 8) for m in masks]
    repls = [(m * v).reshape(1, 2, 8, 8) for m, v in zip(masks, values, strict=True)]
    ort = float(np.abs(runner.run(batch, keeps, repls) - runner.clean(batch)).max())
    return dag, ort


def reproduced(resnet, witness: Witness, counts: list[int], c: float) -> bool:
    """Whether the witness is a real point of the vector and both replays give its error."""
    dag, ort = replayed(resnet, witness)
    x = witness.x.numpy()
    sets = all(int(m.sum()) == k and set(np.unique(m)) <= {0.0, 1.0}
               for m, k in zip(witness.masks, counts, strict=True))
    real = sets and all(float(v.abs().max()) <= c + 1e-12 for v in witness.values) and 0 <= x.min() <= x.max() <= 1
    return (real and abs(dag - witness.error) <= 1e-9 * max(1.0, witness.error)
            and abs(ort - witness.error) <= 1e-4 * max(1.0, witness.error))


def _search(resnet, counts: list[int], c: float, seed: int) -> tuple[Witness, Witness]:
    model = resnet[0]
    data = np.random.default_rng(seed).uniform(0.0, 1.0, (16, 1, 8, 8))
    failure_range = (-c, c)
    found = attack_witness(model, counts, failure_range, (0.0, 1.0), data, [int(seed % 10)],
                           AttackOptions(**{**LIGHT.__dict__, "seed": seed}))
    return found, refine_witness(model, counts, failure_range, (0.0, 1.0), data, found,
                                 RefineOptions(**{**REFINE.__dict__, "seed": seed}))


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(counts=st.lists(st.integers(0, 2), min_size=5, max_size=5).filter(any),
       c=st.sampled_from([0.0, 0.5]), seed=st.integers(0, 50))
def test_refined_errors_are_real_and_never_below_the_attack(resnet, counts, c, seed):
    found, refined = _search(resnet, counts, c, seed)
    assert reproduced(resnet, found, counts, c)
    assert reproduced(resnet, refined, counts, c)
    assert refined.error >= found.error


def test_the_refinement_finds_more_than_a_light_attack(resnet):
    """Not a stage that only hands the witness back: here it finds a larger real error."""
    found, refined = _search(resnet, [2, 2, 2, 2, 2], 0.0, 1)
    assert reproduced(resnet, refined, [2] * 5, 0.0)
    assert refined.error > found.error * 1.001


def test_a_witness_changed_after_measuring_is_caught(resnet):
    counts = [1, 1, 1, 1, 1]
    _, refined = _search(resnet, counts, 0.0, 3)
    moved = [m.clone() for m in refined.masks]
    failed = int(torch.nonzero(moved[0][0]).flatten()[0])
    moved[0][0, failed] = 0.0
    moved[0][0, (failed + 1) % moved[0].shape[1]] = 1.0
    weakened = Witness(refined.error, refined.target, refined.sign, refined.x, moved, refined.values)
    assert reproduced(resnet, refined, counts, 0.0)
    assert not reproduced(resnet, weakened, counts, 0.0)
