"""Speed of ``bound`` on a 2-layer ViT at 32×32, against one onnxruntime inference process.

The target (issue "Sequence and transformer models", README "Speed"): ``robaudit bound`` on a
small vision transformer takes at most 10× one onnxruntime inference, both as a user runs them:
each a whole new process (interpreter start, imports, model load, one run). The model is built
and exported here (PyTorch, legacy exporter, opset 17, symbolic batch): a 4×4 patch embedding
(Conv, 3 → 32 channels: 64 tokens), a learned position embedding, two pre-LN
``nn.TransformerEncoderLayer`` (d = 32, 2 heads, MLP 64, batch first, attention exported
sequence-first inside: docs/method.md §13.4), a final LayerNorm, the mean over tokens and a
10-class head. Weights are torch's random initialization (speed does not depend on training).

    .venv/bin/python benchmarks/bench_vit.py [--repeat 3] [--strict]

Prints the best-of-``repeat`` wall times, their ratio, and the in-process split of the bound
(load and ranges, sensitivities). ``--strict`` exits 1 above the target. BLAS is limited to one
thread (unless set) for both, as onnxruntime's session is given one thread.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

#: Largest accepted ratio bound time / one inference process.
TARGET = 10.0

ORT_RUN = """
import sys, numpy as np, onnxruntime as ort
options = ort.SessionOptions()
options.intra_op_num_threads = 1
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
session.run(None, {"x": np.random.default_rng(0).uniform(0, 1, (1, 3, 32, 32)).astype(np.float32)})
"""


def build_vit(path: Path) -> None:
    """Export the 2-layer ViT described in the module docstring to ``path``."""
    import torch

    class ViT(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patches = torch.nn.Conv2d(3, 32, 4, stride=4)
            self.position = torch.nn.Parameter(torch.randn(1, 64, 32) * 0.02)
            self.blocks = torch.nn.Sequential(
                *(
                    torch.nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True, norm_first=True)
                    for _ in range(2)
                )
            )
            self.norm, self.head = torch.nn.LayerNorm(32), torch.nn.Linear(32, 10)

        def forward(self, x):
            tokens = self.patches(x).flatten(2).transpose(1, 2) + self.position
            return self.head(self.norm(self.blocks(tokens)).mean(1))

    torch.manual_seed(0)
    model = ViT().eval()
    torch.onnx.export(
        model,
        (torch.rand(1, 3, 32, 32),),
        str(path),
        input_names=["x"],
        output_names=["y"],
        opset_version=17,
        dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
        dynamo=False,
    )


def wall(command: list[str]) -> float:
    """Seconds one child process takes, start to exit (its output discarded; a failure stops the script)."""
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def stages(path: Path) -> list[tuple[str, float]]:
    """The bound's in-process split: loading with ranges, then the sensitivities and searches."""
    from robaudit.bounds.audit import BoundOptions, bound_network, load_network, model_info
    from robaudit.graph.network import NetworkOptions

    start = time.perf_counter()
    loaded, network = load_network(path, NetworkOptions())
    loaded_at = time.perf_counter()
    bound_network(network, BoundOptions(epsilon=0.1), model_info(loaded))
    done = time.perf_counter()
    return [
        ("load, IBP and CROWN ranges", loaded_at - start),
        ("faulty ranges, sensitivities, searches", done - loaded_at),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--strict", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="robaudit-vit-") as tmp:
        path = Path(tmp) / "vit2.onnx"
        build_vit(path)
        robaudit = [sys.executable, "-m", "robaudit", "bound", str(path)]
        inference = [sys.executable, "-c", ORT_RUN, str(path)]
        ort_times, bound_times = [], []
        for _ in range(args.repeat):  # taking turns: both see the same load of a shared machine
            ort_times.append(wall(inference))
            bound_times.append(wall(robaudit))
        ratio = min(bound_times) / min(ort_times)
        print(f"2-layer ViT at 32×32 ({path.stat().st_size / 1e3:.0f} kB), best of {args.repeat}:")
        print(f"  one onnxruntime inference process  {min(ort_times):7.2f} s")
        print(f"  robaudit bound                     {min(bound_times):7.2f} s")
        print(f"  ratio {ratio:.1f}× (target ≤ {TARGET:g}×)")
        for name, seconds in stages(path):
            print(f"  in process: {name:40s} {seconds:6.2f} s")
    return 1 if args.strict and ratio > TARGET else 0


if __name__ == "__main__":
    sys.exit(main())
