"""Build paper_mlp_sigmoid.onnx: the paper's setting (dense sigmoid MLP 16-12-8-4).

Built with onnx.helper only (no torch). Deterministic: numpy seed 0.
Run from the repo root:  .venv/bin/python sample_models/make_paper_mlp.py
"""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OUT = Path(__file__).parent / "paper_mlp_sigmoid.onnx"
SIZES = [16, 12, 8, 4]


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits, nodes = [], []
    prev = "x"
    n_layers = len(SIZES) - 1
    for i in range(n_layers):
        n_in, n_out = SIZES[i], SIZES[i + 1]
        # Gemm with transB=1: W has shape [out, in]
        w = rng.uniform(-0.5, 0.5, size=(n_out, n_in)).astype(np.float32)
        b = rng.uniform(-0.05, 0.05, size=(n_out,)).astype(np.float32)
        wn, bn = f"fc{i + 1}.weight", f"fc{i + 1}.bias"
        inits += [numpy_helper.from_array(w, wn), numpy_helper.from_array(b, bn)]
        last = i == n_layers - 1
        gout = "y" if last else f"fc{i + 1}_out"
        nodes.append(helper.make_node("Gemm", [prev, wn, bn], [gout], name=f"fc{i + 1}", transB=1))
        if last:
            prev = gout
        else:
            aout = f"sig{i + 1}_out"
            nodes.append(helper.make_node("Sigmoid", [gout], [aout], name=f"sig{i + 1}"))
            prev = aout
    graph = helper.make_graph(
        nodes,
        "paper_mlp_sigmoid",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", SIZES[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", SIZES[-1]])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17)],
        producer_name="robaudit-sample_models",
    )
    model.ir_version = 8  # widely supported; opset 17 needs IR >= 8
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    model = build()
    onnx.save(model, OUT)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(OUT), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).uniform(0, 1, size=(5, 16)).astype(np.float32)
    y = sess.run(None, {"x": x})[0]
    assert y.shape == (5, 4), y.shape
    ops = sorted({n.op_type for n in model.graph.node})
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes); ops: {ops}")


if __name__ == "__main__":
    main()
