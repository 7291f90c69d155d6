"""Networks whose layer weights are scaled: the one place ``design`` and ``check``'s remedy
build them (docs/method.md §9.1).

The two differ on purpose in what happens to the value ranges, and say so by name:

* :attr:`Ranges.KEPT` — only the weights change; every interval range (hence δ) stays
  that of the original network. ``design``'s ``max_weight_allowed`` is the paper's Fep
  as a function of w_m with everything else fixed.
* :attr:`Ranges.RECOMPUTED` — the weight constants change and interval bound
  propagation runs again, so ranges and δ follow the new weights. ``check``'s
  "what it would take" (:mod:`robaudit.gate.remedy`) is the bound of the model one
  would actually get.

For one layer the two may differ (README "Limits").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from enum import StrEnum

from robaudit.errors import UnsupportedModelError
from robaudit.graph.ibp import evaluate
from robaudit.graph.layers import Layer
from robaudit.graph.network import Network
from robaudit.graph.onnx_graph import Node


class Ranges(StrEnum):
    """What happens to the interval ranges when weights are scaled."""

    #: Ranges of the original network (weights alone change).
    KEPT = "kept"
    #: Ranges propagated again through the scaled weights.
    RECOMPUTED = "recomputed"


def scaled_network(network: Network, factors: Mapping[str, float], ranges: Ranges) -> Network:
    """``network`` with the effective weights of the named layers times their factor, biases kept.

    ``factors`` maps layer names to factors (others are unchanged). With
    :attr:`Ranges.RECOMPUTED` the weight constant of each layer's affine op is scaled
    too and the interval bounds of the input domain are propagated again
    (docs/method.md §5.1). (A weight tensor shared by two layers would be scaled for
    both in the ranges; exporters do not share them.)
    """
    factors = _through_summands(network, factors)
    replaced: dict[int, Layer] = {
        id(layer): dataclasses.replace(layer, weight=layer.weight * factors[layer.name])
        for layer in network.layers
        if layer.name in factors
    }
    for layer in network.layers:  # a sum layer reads its synapses off its summands: the scaled ones
        if layer.summands and any(id(part) in replaced for part in layer.summands):
            parts = tuple(replaced.get(id(part), part) for part in layer.summands)
            replaced[id(layer)] = dataclasses.replace(replaced.get(id(layer), layer), summands=parts)
    steps = [replaced.get(id(step), step) if isinstance(step, Layer) else step for step in network.steps]
    layers = [replaced.get(id(layer), layer) for layer in network.layers]
    if ranges is Ranges.KEPT:
        return dataclasses.replace(network, steps=steps, layers=layers, ranges_kept=True)
    constants = dict(network.constants)
    for layer in network.layers:
        if layer.name in factors:
            weight = _anchor(network, layer).inputs[1]
            constants[weight] = constants[weight] * factors[layer.name]
    nodes = network.nodes  # the audited nodes, recognized activation patterns included
    _, clean = evaluate(network.graph, nodes, network.input_boxes, None, 0, constants)
    return dataclasses.replace(network, steps=steps, layers=layers, constants=constants, clean=clean)


def _through_summands(network: Network, factors: Mapping[str, float]) -> dict[str, float]:
    """``factors`` with a sum layer's factor moved onto its two summands (docs/method.md §1.4): its effective
    weight is theirs (its own identity map is robaudit's, not the model's), and t·(W·x + V·z) is
    (t·W)·x + (t·V)·z. A part that has a factor of its own keeps it (every layer scaled at once: once each)."""
    moved = dict(factors)
    for layer in network.layers:
        if layer.summands and layer.name in moved:
            factor = moved.pop(layer.name)
            for part in layer.summands:
                moved.setdefault(part.name, factor)  # a part named itself keeps its own factor
    return moved


def _anchor(network: Network, layer: Layer) -> Node:
    """The Gemm/MatMul/Conv node of a layer (the first of its nodes, reading its input).

    Raises:
        UnsupportedModelError: the layer has none (:func:`unscalable`).
    """
    anchor = _anchor_or_none(network, layer)
    if anchor is None:
        raise UnsupportedModelError(unscalable(network) or f"layer '{layer.name}' has no weight robaudit can rescale")
    return anchor


def _anchor_or_none(network: Network, layer: Layer) -> Node | None:
    return next(
        (node for node in network.graph.nodes if node.name == layer.nodes[0] and layer.input_value in node.inputs),
        None,
    )


def unscalable(network: Network) -> str | None:
    """Why the weights of ``network``'s layers cannot be multiplied by factors — in its layer graph and in the
    model file (the weight targets of ``check``'s remedy, docs/method.md §9.1) — or None when they can:
    a recurrent layer's unrolled steps share the GRU/LSTM op's weight tensors, and a layer whose affine node is
    not in the graph as an op reading the layer's input holds no float weight to rescale (a dynamically
    quantized layer: an integer product and its scales)."""
    for layer in network.layers:
        if layer.internal or layer.tied:
            return f"layer '{layer.name}' is part of a recurrent (GRU/LSTM) op, whose weights robaudit does not rescale"
        if layer.summands:
            continue  # its weights are its summands', rescaled in their place (docs/method.md §1.4)
        if _anchor_or_none(network, layer) is None:
            return (
                f"layer '{layer.name}' has no float weight this search can rescale (no op '{layer.nodes[0]}' reads "
                "its input: e.g. a dynamically quantized layer, whose weight scales robaudit design rescales)"
            )
    return None
