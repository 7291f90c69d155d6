"""What does reading a float16 model cost the bound? (docs/method.md §1.2, "float16 arithmetic")

Each network of ``trained_nets.NETWORKS`` named below is trained here on scikit-learn's digits (seconds)
and exported twice: as trained (float32) and after ``.half()`` (float16 input, weights and arithmetic).
For one crashed neuron per hidden layer the script prints, per network, ``fep_tight`` of both files
(the float32 one's is the baseline, computed in the same run), their ratio, and the worst error that
``inject --search worst`` (failure sets and the input searched together, docs/method.md §8) finds on
the float16 model, with ``fep_tight / worst found``. The float16 bound is the float32 model's plus every
op's rounding, on interval ranges where a rounding sits inside a layer: the ratio shows what that costs.

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


def worst_found(path: Path, layers: int) -> float:
    """The largest error ``inject --search worst`` finds for one crash per hidden layer (input moved too)."""
    loaded, network = load_network(path, NetworkOptions())
    options = InjectOptions(failure=FailureModel.crash(), failures=(1,) * layers, search="worst", samples=64,
                            seed=0)
    result = run_injection(network, options, model_info(loaded))
    return max(vector.measured.max for vector in result.vectors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default=DEFAULT_NETS)
    args = parser.parse_args()
    print(f"{'network':<16} {'acc':>5} {'fep_tight f32':>13} {'fep_tight f16':>13} {'f16/f32':>8} "
          f"{'worst f16':>10} {'f16/worst':>9}")
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


if __name__ == "__main__":
    main()
