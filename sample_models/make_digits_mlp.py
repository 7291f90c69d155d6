"""Build digits_mlp.onnx: scikit-learn MLPClassifier (64-32-16-10, ReLU) on load_digits.

Also writes digits_inputs.npz with x (first 200 samples, float32 in [0,1]) and
labels (int64). Deterministic: random_state=0, sklearn's bundled data only.
Run from the repo root:  .venv/bin/python sample_models/make_digits_mlp.py
"""

import warnings
from pathlib import Path

import numpy as np
import onnx
from skl2onnx import to_onnx
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier
from threadpoolctl import threadpool_limits

HERE = Path(__file__).parent
OUT = HERE / "digits_mlp.onnx"
NPZ = HERE / "digits_inputs.npz"


def main() -> None:
    digits = load_digits()
    X = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    clf = MLPClassifier(hidden_layer_sizes=(32, 16), activation="relu", max_iter=300, random_state=0)
    # one BLAS thread: the same summation order on any core count
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X, y)
    print(f"train accuracy: {clf.score(X, y):.4f}")

    model = to_onnx(
        clf,
        X[:1],
        options={"zipmap": False},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    model.producer_version = ""  # keep the file independent of the skl2onnx patch version
    # skl2onnx emits opset_import in set order (varies with PYTHONHASHSEED): sort it
    opsets = sorted((o.domain, o.version) for o in model.opset_import)
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in opsets)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, OUT)

    x200, l200 = X[:200], y[:200]
    np.savez_compressed(NPZ, x=x200, labels=l200)

    import onnxruntime as ort

    sess = ort.InferenceSession(str(OUT), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    outs = sess.run(None, {sess.get_inputs()[0].name: x200})
    probs = dict(zip(names, outs, strict=True))["probabilities"]
    np.testing.assert_allclose(probs, clf.predict_proba(x200), atol=1e-4)
    acc = float((outs[0] == l200).mean())
    print(f"onnx accuracy on the 200 saved samples: {acc:.4f}")
    ops = sorted({n.op_type for n in model.graph.node})
    ins = [
        (i.name, [d.dim_param or d.dim_value or "?" for d in i.type.tensor_type.shape.dim]) for i in model.graph.input
    ]
    print(f"inputs: {ins}; outputs: {names}")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes); ops: {ops}")
    print(f"wrote {NPZ} ({NPZ.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
