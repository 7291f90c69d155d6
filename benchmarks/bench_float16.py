"""What does reading a float16 model cost the bound? (docs/method.md §1.2, "float16 arithmetic")

Each network of ``trained_nets.NETWORKS`` named below is trained here on scikit-learn's digits (seconds)
and exported twice: as trained (float32) and after ``.half()`` (float16 input, weights and arithmetic).
For one crashed neuron per hidden layer the script prints, per network, ``fep_tight`` of both files
(the float32 one's is the baseline, computed in the same run), their ratio, and the worst error that
``inject --search worst`` (failure sets and the input searched together, docs/method.md §8) finds on
the float16 model, with ``fep_tight / worst found``. The float16 bound is the float32 model's plus every
op's rounding, on interval ranges where a rounding sits inside a layer: the ratio shows what that costs.

A second table: one bit flip per hidden layer at the word's top mantissa bit and at its sign (float16:
bits 9 and 15; float32, the baseline of the same run: bits 22 and 31; docs/method.md §2.3), ``fep_tight``
beside the worst error ``inject --search worst`` finds for the same flips, and their ratio.

    python benchmarks/bench_float16.py [--nets mlp_64_32,cnn_bn_pool]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from trained_nets import trained

from robaudit.bounds.audit import BoundOptions, compute_bound, load_network, model_info
from robaudit.bounds.fep import FailureModel
from robaudit.errors import RobauditError
from robaudit.graph.network import NetworkOptions
from robaudit.injection.campaign import run_injection
from robaudit.injection.results import InjectOptions

DEFAULT_NETS = "mlp_64_32,mlp_tanh_64_32,cnn_bn_pool,resnet_small"


def export_half(model: torch.nn.Module, path: Path) -> Path:
    """The model after ``.half()``, exported with a float16 input (legacy exporter, opset 17)."""
    half = model.half().eval()
    torch.onnx.export(half, (torch.zeros(1, 1, 8, 8, dtype=torch.float16),), str(path), dynamo=False,
                      opset_version=17, input_names=["input"], output_names=["logits"])
    return path


def worst_found(path: Path, layers: int, failure: FailureModel | None = None) -> float:
    """The largest error ``inject --search worst`` finds for one failure per hidden layer (a crash unless
    ``failure``; the input moved too where the search can move it)."""
    loaded, network = load_network(path, NetworkOptions())
    options = InjectOptions(failure=failure or FailureModel.crash(), failures=(1,) * layers, search="worst",
                            samples=64, seed=0)
    result = run_injection(network, options, model_info(loaded))
    return max(vector.measured.max for vector in result.vectors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default=DEFAULT_NETS)
    args = parser.parse_args()
    print(f"{'network':<16} {'acc':>5} {'fep_tight f32':>13} {'fep_tight f16':>13} {'f16/f32':>8} "
          f"{'worst f16':>10} {'f16/worst':>9}")
    flips = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.nets.split(","):
            model, single, accuracy = trained(name, Path(tmp))
            half = export_half(model, Path(tmp) / f"{name}_f16.onnx")
            figures = []
            for path in (single, half):
                layers = len(compute_bound(path, BoundOptions(epsilon=1.0)).layers)
                figures.append(compute_bound(path, BoundOptions(epsilon=1.0, failures=(1,) * layers)).fep_tight)
            worst = worst_found(half, layers)
            print(f"{name:<16} {accuracy:5.3f} {figures[0]:13.4g} {figures[1]:13.4g} {figures[1] / figures[0]:8.3f} "
                  f"{worst:10.4g} {figures[1] / worst:9.2f}")
            flips.append((name, single, half, layers))
        print(f"\n{'network':<16} {'word':>7} {'bit':>4} {'fep_tight':>10} {'worst found':>11} {'bound/worst':>11}")
        for name, single, half, layers in flips:
            for word, path, bits in (("float32", single, (22, 31)), ("float16", half, (9, 15))):
                for bit in bits:
                    failure = FailureModel.bit_flip(bit)
                    try:
                        bound = compute_bound(path, BoundOptions(epsilon=1.0, failures=(1,) * layers, failure=failure))
                    except RobauditError as exc:  # a float16 value that such flips may carry past 65504: refused
                        print(f"{name:<16} {word:>7} {bit:>4} refused: {exc}")
                        continue
                    worst = worst_found(path, layers, failure)
                    print(f"{name:<16} {word:>7} {bit:>4} {bound.fep_tight:10.4g} {worst:11.4g} "
                          f"{bound.fep_tight / worst:11.2f}")


if __name__ == "__main__":
    main()
