"""Inputs and labels for ``inject`` (docs/method.md §8): every malformed file is one clear
:class:`InputDataError` (exit code 2), never a traceback; sampling stays in the domain."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from robaudit.errors import InputDataError
from robaudit.inputs import (
    check_inputs,
    check_labels,
    load_inputs,
    load_labels,
    outside_domain,
    read_array,
    sample_inputs,
)

SHAPE = (1, 4, 4)


def _save(tmp_path, name, array, **kwargs):
    path = tmp_path / name
    np.save(path, array, **kwargs)
    return path


def test_npy_and_npz_are_read(tmp_path):
    x = np.random.default_rng(0).uniform(0, 1, (3, *SHAPE)).astype(np.float32)
    got, where = load_inputs(_save(tmp_path, "x.npy", x), SHAPE)
    np.testing.assert_array_equal(got, x)
    np.savez(tmp_path / "d.npz", x=x, labels=np.array([0, 1, 2]), other=np.zeros(2))
    got, where = load_inputs(tmp_path / "d.npz", SHAPE)
    assert where.endswith("d.npz:x")
    np.testing.assert_array_equal(got, x)
    labels, where = load_labels(tmp_path / "d.npz", 3, 10)
    assert where.endswith(":labels") and labels.tolist() == [0, 1, 2]
    np.savez(tmp_path / "named.npz", images=x, extra=np.zeros(1))
    got, _ = load_inputs(f"{tmp_path / 'named.npz'}:images", SHAPE)
    np.testing.assert_array_equal(got, x)
    single, _ = load_inputs(_save(tmp_path, "one.npy", x[0].astype(np.float64)), SHAPE)
    assert single.shape == (1, *SHAPE) and single.dtype == np.float32


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.full((2, *SHAPE), np.inf, np.float32), "NaN or Inf values \\(first in sample 0\\)"),
        (np.zeros((2, 16), np.float32), "shape \\[2, 16\\]; the model's input needs \\[N, 1, 4, 4\\]"),
        (np.zeros((2, *SHAPE), np.uint8), "dtype uint8"),
        (np.zeros((0, *SHAPE), np.float32), "no samples"),
        (np.zeros((2, *SHAPE), bool), "dtype bool"),
    ],
)
def test_bad_input_arrays(array, message):
    with pytest.raises(InputDataError, match=message):
        check_inputs(array, SHAPE, "'f.npy'")


def test_bad_files(tmp_path):
    with pytest.raises(InputDataError, match="does not exist"):
        read_array(tmp_path / "missing.npy", "inputs", ())
    with pytest.raises(InputDataError, match="not a regular file"):
        read_array(tmp_path, "inputs", ())
    pickled = _save(tmp_path, "p.npy", np.array([object()], dtype=object), allow_pickle=True)
    with pytest.raises(InputDataError, match="pickles are refused"):
        read_array(pickled, "inputs", ())
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(InputDataError, match="junk.npz"):
        read_array(tmp_path / "junk.npz", "inputs", ())
    np.savez(tmp_path / "two.npz", a=np.zeros(1), b=np.zeros(1))
    with pytest.raises(InputDataError, match="several arrays \\(a, b\\)"):
        read_array(tmp_path / "two.npz", "inputs", ("x",))
    with pytest.raises(InputDataError, match="no array 'c' \\(arrays: a, b\\)"):
        read_array(f"{tmp_path / 'two.npz'}:c", "inputs", ())
    with pytest.raises(InputDataError, match="applies to .npz files only|does not exist"):
        read_array(f"{_save(tmp_path, 'x.npy', np.zeros(2))}:x", "inputs", ())


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.array([0, 1]), "2 labels for 3 inputs"),
        (np.array([0, 1, 10]), "range over \\[0, 10\\]; the model has 10 outputs"),
        (np.array([0, -1, 2]), "range over \\[-1, 2\\]"),
        (np.array([0.0, 1.5, 2.0]), "not whole numbers"),
        (np.zeros((3, 2), np.int64), "shape \\[3, 2\\]"),
        (np.array(["a", "b", "c"]), "dtype <U1"),
    ],
)
def test_bad_labels(labels, message):
    with pytest.raises(InputDataError, match=message):
        check_labels(labels, 3, 10, "'l.npy'")


def test_labels_of_a_one_output_model_say_why_they_cannot_be_compared():
    """0/1 labels for a single-sigmoid binary classifier: the refusal says that one output has no arg-max."""
    with pytest.raises(InputDataError, match="one output has no arg-max"):
        check_labels(np.array([0, 1, 1]), 3, 1, "'l.npy'")


def test_labels_accepts_column_and_whole_floats():
    assert check_labels(np.array([[1], [2]]), 2, 3, "").tolist() == [1, 2]
    assert check_labels(np.array([1.0, 0.0]), 2, 3, "").tolist() == [1, 0]


def test_samples_lie_in_the_domain_and_depend_on_the_seed():
    a = sample_inputs(50, SHAPE, (-0.5, 2.0), np.random.default_rng(3))
    b = sample_inputs(50, SHAPE, (-0.5, 2.0), np.random.default_rng(3))
    c = sample_inputs(50, SHAPE, (-0.5, 2.0), np.random.default_rng(4))
    assert a.shape == (50, *SHAPE) and a.dtype == np.float32
    assert a.min() >= -0.5 and a.max() <= 2.0 and a.max() - a.min() > 2.0
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert outside_domain(a, (-0.5, 2.0)) == 0.0
    assert outside_domain(np.array([0.0, 0.5, 1.5, -1.0]), (0.0, 1.0)) == 0.5


def test_a_lone_array_named_for_the_other_kind_is_refused(tmp_path):
    """An ``.npz`` whose one array is named ``y`` given as the inputs was read as inputs without a word (a new-user
    trial's file held the labels only), and one whose array is ``x`` as the labels: both refused in one line naming
    the array; named explicitly, each is read; a lone array of another name is still taken."""
    x = np.random.default_rng(0).uniform(0, 1, (3, *SHAPE)).astype(np.float32)
    np.savez(tmp_path / "y.npz", y=x)
    with pytest.raises(InputDataError, match=r"holds only 'y', a name for labels; .*'.*y\.npz:y'"):
        load_inputs(tmp_path / "y.npz", SHAPE)
    np.testing.assert_array_equal(load_inputs(f"{tmp_path / 'y.npz'}:y", SHAPE)[0], x)
    np.savez(tmp_path / "x.npz", x=np.array([0, 1, 2]))
    with pytest.raises(InputDataError, match=r"holds only 'x', a name for inputs"):
        load_labels(tmp_path / "x.npz", 3, 10)
    assert load_labels(f"{tmp_path / 'x.npz'}:x", 3, 10)[0].tolist() == [0, 1, 2]
    np.savez(tmp_path / "images.npz", images=x)
    np.testing.assert_array_equal(load_inputs(tmp_path / "images.npz", SHAPE)[0], x)


def test_the_bracket_says_when_inputs_lie_outside_the_domain(tmp_path):
    """`inject --search worst` on inputs partly outside the domain: the bracket's lower end may come from them, where
    the bound makes no claim, and the line says so (nu26 read 2.16 ≤ true worst from inputs scaled to [0, 16]);
    inside the domain it does not."""
    from conftest import SAMPLES, run_in_process

    rng = np.random.default_rng(0)
    inside = rng.uniform(0, 1, (4, 64)).astype(np.float32)
    np.save(tmp_path / "inside.npy", inside)
    np.save(tmp_path / "outside.npy", inside * 3.0)
    lines = {}
    for name in ("inside", "outside"):
        out = run_in_process("inject", SAMPLES / "digits_mlp.onnx", "--inputs", tmp_path / f"{name}.npy", "--crash",
                             "1", "--search", "worst", "--trials", "2", "-q", expect=None).stdout
        lines[name] = " ".join(line for line in out.splitlines() if "bracket" in line or "true worst only" in line)
    assert "bracket: best found" in lines["inside"] and "outside the domain" not in lines["inside"]
    assert "partly outside the domain" in lines["outside"]


def test_labels_at_chance_level_get_a_note():
    """Labels in another order than the inputs (the digits labels shuffled): inject's report notes that the clean
    accuracy (about 8 %) is about what always answering the most common label gives, and harden says so
    on stderr; the labels in their order (accuracy 90 % and more) get no note."""
    import json

    from conftest import SAMPLES, run_in_process

    data = np.load(SAMPLES / "digits_inputs.npz")
    shuffled = data["labels"].copy()
    np.random.default_rng(0).shuffle(shuffled)
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "shuffled.npy", shuffled)
        for labels, noted in ((Path(tmp) / "shuffled.npy", True), (SAMPLES / "digits_inputs.npz", False)):
            report = json.loads(run_in_process(
                "inject", SAMPLES / "digits_mlp.onnx", "--inputs", SAMPLES / "digits_inputs.npz", "--labels", labels,
                "--crash", "1", "--format", "json").stdout)
            assert any("same order as the inputs" in n for n in report["notes"]) == noted
        hardened = run_in_process("harden", SAMPLES / "digits_cnn.onnx", "--inputs", SAMPLES / "digits_cnn_inputs.npz",
                                  "--labels", Path(tmp) / "shuffled.npy", "-o", Path(tmp) / "h.onnx")
        assert "robaudit: note: the clean accuracy on these labels" in hardened.stderr


def test_certify_notes_shuffled_labels_and_an_epsilon_that_decides_nothing():
    """certify says what inject and harden say of labels at chance level, and that ``-e`` decides nothing for an
    output with classes (a new-user trial saw both pass without a word); its table opens with the model's line."""
    import json

    from conftest import SAMPLES, run_in_process

    data = np.load(SAMPLES / "digits_cnn_inputs.npz")
    shuffled = data["labels"][:40].copy()
    np.random.default_rng(0).shuffle(shuffled)
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "x.npy", data["x"][:40])
        np.save(Path(tmp) / "shuffled.npy", shuffled)
        np.save(Path(tmp) / "labels.npy", data["labels"][:40])
        common = ["certify", SAMPLES / "digits_cnn.onnx", "--inputs", Path(tmp) / "x.npy", "--no-layer-counts", "-q"]
        cases = (("shuffled.npy", [], (True, False)), ("labels.npy", ["-e", "30"], (False, True)))
        for labels, epsilon, noted in cases:
            report = json.loads(run_in_process(*common, "--labels", Path(tmp) / labels, *epsilon,
                                               "--format", "json").stdout)
            chance = any("same order as the inputs" in n for n in report["notes"])
            unused = any("ε = 30 decides nothing" in n for n in report["notes"])
            assert (chance, unused) == noted, report["notes"]
        table = run_in_process(*common).stdout
        assert table.splitlines()[0].startswith(f"{SAMPLES / 'digits_cnn.onnx'} — certificates")
