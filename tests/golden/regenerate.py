"""Write the golden bound reports of every sample model and failure mode into tests/golden/.

Run it when a change *tightens* the bounds on purpose (``tests/test_golden.py`` fails only
when a bound loosens or a tolerated count drops, and prints this command):

    .venv/bin/python tests/golden/regenerate.py

Each file is the JSON report ``robaudit bound`` writes (the model's path left out), for one
model in one mode: crash, and byzantine with capacity 1. The settings are in CASES.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from robaudit.bounds.audit import BoundOptions, compute_bound  # noqa: E402
from robaudit.bounds.fep import FailureModel  # noqa: E402
from robaudit.formats import report_dict  # noqa: E402
from robaudit.formats.serial import to_json  # noqa: E402

#: model → ε (chosen so that the tolerated counts are not all 0 in crash mode).
MODELS = {
    "digits_cnn": 100.0,
    "digits_cnn_int8": 20.0,
    "digits_mlp": 200.0,
    "lenet": 1500.0,
    "mobilenet_se": 0.5,
    "paper_mlp_sigmoid": 2.0,
    "resnet_small": 2.0,
    "resnet_small_bn": 2.0,
    "text_gru": 300.0,
    "encoder": 2e8,
}
#: mode → failure model.
MODES = {"crash": FailureModel.crash(), "byzantine": FailureModel.byzantine(capacity=1.0)}


def case_name(model: str, mode: str) -> str:
    """The golden file's stem."""
    return f"{model}.{mode}"


def options_for(model: str, mode: str) -> BoundOptions:
    """The bound options of one case: ε of the model, one failed neuron per hidden layer for Fep."""
    return BoundOptions(epsilon=MODELS[model], failure=MODES[mode], failures=(1,))


def report(model: str, mode: str) -> dict:
    """The JSON-ready report of one case, without the machine-dependent model path."""
    result = compute_bound(ROOT / "sample_models" / f"{model}.onnx", options_for(model, mode))
    data = json.loads(to_json(report_dict(result)))
    data["model"].pop("path", None)
    return data


def main() -> None:
    for model in MODELS:
        for mode in MODES:
            path = GOLDEN / f"{case_name(model, mode)}.json"
            path.write_text(json.dumps(report(model, mode), indent=2, sort_keys=True) + "\n", encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
