"""The blocked products behind interval propagation and the tight adjoint (ops/affine.py)
agree with plain float64 numpy on weights larger than one block, in every layout."""

from __future__ import annotations

import numpy as np
import pytest

from robaudit.graph.ops.affine import BLOCK_ELEMENTS, weight_extremes, weight_products


@pytest.mark.parametrize("shape", [(140000, 3), (3, 140000), (600, 1000)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("layout", ["C", "F", "strided"])
def test_products_match_numpy(shape, dtype, layout):
    rng = np.random.default_rng(0)
    weight = rng.normal(size=shape).astype(dtype)
    if layout == "F":
        weight = np.asfortranarray(weight)
    elif layout == "strided":
        weight = np.repeat(weight, 2, axis=1)[:, ::2]
    assert weight.size > BLOCK_ELEMENTS  # several blocks
    left = rng.normal(size=(4, shape[0]))
    signed, absolute = weight_products(weight, [(left, False), (left, True)])
    reference = np.asarray(weight, np.float64)
    np.testing.assert_allclose(signed, left @ reference, rtol=1e-11, atol=1e-9)
    np.testing.assert_allclose(absolute, left @ np.abs(reference), rtol=1e-11, atol=1e-9)


def test_extremes_match_numpy_and_see_nan():
    weight = np.random.default_rng(1).normal(size=(1000, 700)).astype(np.float32)
    assert weight_extremes(weight) == (float(weight.min()), float(weight.max()))
    weight[999, 699] = np.nan
    assert np.isnan(weight_extremes(weight)[0])


@pytest.mark.parametrize("limit", [0, 1, 7, 999, 1000, None])
def test_top_prefix_sums_with_a_limit_equals_the_full_sort(limit):
    from robaudit.bounds.fep import top_prefix_sums

    values = np.random.default_rng(2).random((5, 1000))
    full = np.concatenate([np.zeros((5, 1)), np.cumsum(-np.sort(-values, axis=1), axis=1)], axis=1)
    got = top_prefix_sums(values, limit)
    np.testing.assert_allclose(got, full[:, : got.shape[1]])
    assert got.shape[1] == (1001 if limit is None else min(limit, 1000) + 1)


@pytest.mark.parametrize("sample", ["lenet", "resnet_small_bn", "digits_mlp", "mobilenet_se"])
def test_weight_ranges_read_during_loading_equal_a_fresh_read(sample):
    """Layers reuse the (min, max) read while checking constants for NaN; it must be the
    range of the weight the layer really holds — also after folding and after replace()."""
    import dataclasses
    from pathlib import Path

    from robaudit.bounds.audit import load_network
    from robaudit.graph.network import NetworkOptions

    _, network = load_network(
        Path(__file__).resolve().parents[1] / "sample_models" / f"{sample}.onnx", NetworkOptions()
    )
    for layer in network.layers:
        assert layer.weight_range == weight_extremes(layer.weight), layer.name
        scaled = dataclasses.replace(layer, weight=layer.weight * 3.0)
        assert scaled.weight_range == weight_extremes(scaled.weight), layer.name
