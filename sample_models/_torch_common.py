"""Shared helpers for the torch-based sample model scripts (not a model script itself)."""

from pathlib import Path

import numpy as np
import onnx
import torch


def seed_everything(seed: int = 0) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(1)  # single-threaded CPU kernels: bitwise-reproducible training
    torch.use_deterministic_algorithms(True)


def export(model: torch.nn.Module, example: torch.Tensor, path: Path, **extra) -> onnx.ModelProto:
    """Legacy (TorchScript) export, opset 17, dynamic batch axis, names input/logits.

    ``extra`` is passed on to torch.onnx.export (e.g. ``training=TrainingMode.PRESERVE``).
    """
    model.eval()
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        **extra,
    )
    m = onnx.load(str(path))
    # drop the torch version string so the bytes do not depend on the torch patch release
    m.producer_version = ""
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))
    return m


def check_against_ort(model: torch.nn.Module, path: Path, shape, atol: float = 1e-4, seed: int = 123) -> None:
    import onnxruntime as ort

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g)
    with torch.no_grad():
        ref = model(x).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    err = float(np.abs(got - ref).max())
    print(f"onnxruntime vs torch on random input {tuple(shape)}: max abs diff {err:.3g}")
    np.testing.assert_allclose(got, ref, atol=atol, rtol=0)


def describe(m: onnx.ModelProto, path: Path) -> None:
    def dims(vi):
        return [d.dim_param or d.dim_value or "?" for d in vi.type.tensor_type.shape.dim]

    ops = sorted({n.op_type for n in m.graph.node})
    counts = {}
    for n in m.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    print("inputs:", [(i.name, dims(i)) for i in m.graph.input])
    print("outputs:", [(o.name, dims(o)) for o in m.graph.output])
    print("op counts:", counts)
    print(f"wrote {path} ({path.stat().st_size} bytes); ops: {ops}")
