"""The console examples of README.md and docs/applications.md are real output: rerun every
command and compare.

Regenerate them after a change of output with ``python tests/readme_examples.py --write``.
"""

from __future__ import annotations

import pytest
from readme_examples import FILES, README, compare, examples, regenerate


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_console_examples_are_real_output(path):
    text = path.read_text(encoding="utf-8")
    assert len(examples(text.splitlines())) >= (7 if path == README else 5), f"{path} lost its examples"
    problems = compare(text)
    assert not problems, (
        "README examples differ from real runs; regenerate them with python tests/readme_examples.py --write\n\n"
        + "\n\n".join(problems)
    )


def test_a_doctored_example_is_caught_and_regenerated():
    command = "robaudit bound sample_models/paper_mlp_sigmoid.onnx -e 0.5 \\\n      --crash 1"
    text = f"intro\n\n```console\n$ {command}\nuniform: 12 (made up)\n$ echo $?\n0\n```\n"
    (found,) = [e for e in examples(text.splitlines()) if "bound" in e.command]
    assert found.command.endswith("-e 0.5 --crash 1") and found.shown == ["uniform: 12 (made up)"]
    (problem,) = compare(text)
    assert "uniform: 12 (made up)" in problem and "+uniform (same count in every layer): 1" in problem, problem
    fixed = regenerate(text)
    assert compare(fixed) == [] and "made up" not in fixed and fixed.startswith("intro\n"), fixed


def test_int8_inject_examples_compare_their_words_not_onnxruntimes_figures():
    """onnxruntime's int8 kernels differ by CPU: an inject example on an int8 model is compared with its numbers
    masked and its lines joined (other numbers wrap elsewhere), any other example as it is."""
    from readme_examples import _masked

    command = "robaudit inject sample_models/digits_cnn_int8.onnx --bit-flip 1"
    here = ["│ [1, 1, 1] │ 15.23 │ 6.254 │ > ε    │", "worst fault set (error 15.23 on input 8): [(4,4,4) bit", "7]"]
    there = ["│ [1, 1, 1] │ 16.53 │   11 │ > ε    │", "worst fault set (error 16.53 on input 105): [(0,2,5)", "bit 7]"]
    assert _masked(command, here) == _masked(command, there)
    assert _masked(command, here) != _masked(command, [line.replace("> ε", "ok") for line in there])
    float_command = "robaudit inject sample_models/digits_cnn.onnx --crash 1"
    assert _masked(float_command, here) != _masked(float_command, there)
