"""--plot on bound and inject: a PNG of the expected size, measured points drawn, bad names refused."""

from __future__ import annotations

import struct

import pytest
from conftest import SAMPLES, run_in_process

pytestmark = pytest.mark.cli

pytest.importorskip("matplotlib")
MLP = SAMPLES / "paper_mlp_sigmoid.onnx"


def png_size(path) -> tuple[int, int]:
    """(width, height) from the PNG header."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    return struct.unpack(">II", data[16:24])


def test_bound_plot_with_measured_points(tmp_path):
    target = tmp_path / "bound.png"
    run_in_process("bound", MLP, "-e", "0.5", "--empirical", "--samples", "16", "--plot", target)
    assert png_size(target) == (960, 600)


def test_inject_plot_of_one_layer(tmp_path):
    target = tmp_path / "inject.png"
    run_in_process("inject", MLP, "--crash", "2", "--layer", "fc1", "--samples", "16", "--plot", target, "-q")
    assert png_size(target) == (960, 600)


def test_inject_plot_explains_uneven_multi_layer_vectors(tmp_path):
    proc = run_in_process("inject", MLP, "--crash", "2,1", "--samples", "8", "--plot", tmp_path / "x.png", "-q")
    assert "--layer NAME" in proc.stderr, proc.stderr


@pytest.mark.parametrize("command", ["bound", "inject"])
def test_plot_needs_a_png_name(command, tmp_path):
    proc = run_in_process(command, MLP, "--plot", tmp_path / "x.jpg", expect=2)
    assert proc.stderr.count("\n") == 1 and ".png" in proc.stderr
