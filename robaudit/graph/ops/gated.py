"""Activations exported as subgraphs: x · g(x) (SiLU, GELU, HardSwish, Mish), x / g(x)
(Softsign) and PyTorch's thresholded softplus.

Exporters often write ``x * Sigmoid(x)`` or ``x * 0.5 * (1 + Erf(x / √2))`` instead of a
single op. A product of two variable tensors would otherwise be bounded by the loose
product rule; here the whole pattern x · g(x) — g a chain of element-wise ops of x
alone — is evaluated on a grid and matched against known functions, and when it
matches c·template (c > 0) it is treated as one activation with Lipschitz c·K.

Two patterns use ops that have no interval rule at all (a division by a variable,
Greater/Where), so they are fused before the first interval pass
(:func:`recognize_early`): ``x / (1 + |x|)`` (PyTorch's Softsign, both exporters) and
``Where(β·x > t, x, Softplus(β·x) / β)`` (``nn.Softplus(beta, threshold)`` from the
default exporter).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from robaudit.graph.onnx_graph import Node
from robaudit.graph.ops.activations import (
    Activation,
    Gelu,
    HardSwish,
    Mish,
    Softsign,
    _sigmoid,
    _softplus,
    gelu_erf,
    gelu_tanh,
    hardswish,
    mish,
    softsign,
    template_slope,
)
from robaudit.graph.ops.base import Interval, broadcast_scalar, lookup, register

#: SiLU x·σ(x) has no ONNX op of its own (only this pattern): its facts live here.
SILU_K, SILU_MINIMUM = 1.1, -1.2784645

#: name → (function, global Lipschitz constant (docs/method.md §3.3), argmin of the function);
#: the constants are those of the op's own rule.
TEMPLATES: dict[str, tuple[Callable[[np.ndarray], np.ndarray], float, float | None]] = {
    "SiLU": (lambda x: x * _sigmoid(x), SILU_K, SILU_MINIMUM),
    "Gelu": (gelu_erf, Gelu.K, Gelu.MINIMA["none"]),
    "GeluTanh": (gelu_tanh, Gelu.K, Gelu.MINIMA["tanh"]),
    "HardSwish": (hardswish, HardSwish.K, HardSwish.minimum_at),
    "Mish": (mish, Mish.K, Mish.minimum_at),
    "Softsign": (softsign, Softsign.K, Softsign.minimum_at),
}
_GRID = np.concatenate([-np.logspace(-3, 3, 400), np.linspace(-8.0, 8.0, 1601), np.logspace(-3, 3, 400)])
_CHAIN_OPS = {
    "Sigmoid",
    "Tanh",
    "Erf",
    "HardSigmoid",
    "Softplus",
    "Relu",
    "Clip",
    "Neg",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "Abs",
}


@register
class GatedActivation(Activation):
    """The synthetic op that replaces a recognized x·g(x) subgraph."""

    op_types = ("GatedActivation",)
    domain = "robaudit"

    def shown(self, node):
        return str(node.attr("template"))

    def lipschitz(self, node: Node) -> float:
        return node.attr("scale") * TEMPLATES[node.attr("template")][1]

    def function(self, node: Node, x: np.ndarray) -> np.ndarray:
        return node.attr("scale") * TEMPLATES[node.attr("template")][0](np.asarray(x, np.float64))

    def max_slope(self, node: Node, lo, hi, constants=None) -> np.ndarray:
        """c·sup |template′| over [lo, hi] (docs/method.md §4.3)."""
        return node.attr("scale") * template_slope(node.attr("template"), lo, hi)

    def minimum(self, node: Node) -> float | None:
        return TEMPLATES[node.attr("template")][2]


@register
class ScaledSoftplus(Activation):
    """The synthetic op for PyTorch's ``Where(β·x > t, x, Softplus(β·x) / β)``: softplus(β·x)/β, K = 1.

    Above the threshold the exported function returns x, below softplus(β·x)/β; they
    differ by log(1 + e^(−β·x))/β ≤ log(1 + e^(−t))/β (``jump``; 2·10⁻⁹/β at PyTorch's
    t = 20, below float32 resolution at |x| ≥ t/β). Intervals take it off the lower end.
    """

    op_types = ("ScaledSoftplus",)
    domain = "robaudit"

    def shown(self, node):
        return str(node.attr("template", "Softplus"))

    def function(self, node: Node, x: np.ndarray) -> np.ndarray:
        beta = node.attr("beta")
        return _softplus(beta * np.asarray(x, np.float64)) / beta

    def max_slope(self, node: Node, lo, hi, constants=None) -> np.ndarray:
        """softplus(β·x)/β has slope σ(β·x), increasing: σ(β·hi)."""
        return _sigmoid(node.attr("beta") * np.asarray(hi, np.float64)) + 0.0 * np.asarray(lo)

    def interval(self, node, args):
        (box,) = super().interval(node, args)
        return [Interval(box.lo - node.attr("jump"), box.hi)]


def _scalar(constants: dict, name: str) -> float | None:
    return broadcast_scalar(constants.get(name))


def _eval_chain(node: Node, x: np.ndarray, values: dict, constants: dict) -> np.ndarray | None:
    """Evaluate one element-wise chain node on a grid, or None if it is not element-wise-scalar."""
    args = []
    for name in node.inputs:
        if name in values:
            args.append(values[name])
        elif name and _scalar(constants, name) is not None:
            args.append(np.float64(_scalar(constants, name)))
        elif name:
            return None
        else:
            args.append(None)
    if node.op_type == "Pow":
        if not isinstance(args[1], np.float64):
            return None
        return np.power(args[0], args[1])
    if node.op_type in ("Add", "Sub", "Mul", "Div"):
        a, b = args[0], args[1]
        return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[node.op_type](a, b)
    rule = lookup(node)
    if not isinstance(rule, Activation):
        return None
    const_args = [None] + [a if isinstance(a, np.float64) else None for a in args[1:]]
    if node.op_type == "Clip":
        return rule.interval(node, [Interval.point(args[0])] + const_args[1:])[0].lo
    return rule.function(node, args[0])


def _gate_chain(x: str, gate: str, producer: dict, constants: dict) -> list[Node] | None:
    """Nodes computing ``gate`` from ``x`` alone (element-wise, scalar constants), in order."""
    chain: list[Node] = []
    stack = [gate]
    seen: set[str] = set()
    while stack:
        value = stack.pop()
        if value == x or value in seen or (value in constants):
            continue
        seen.add(value)
        node = producer.get(value)
        if node is None or node.op_type not in _CHAIN_OPS or len(chain) > 12:
            return None
        chain.append(node)
        stack.extend(v for v in node.inputs if v and v not in constants)
    return list(reversed(chain))


def match_template(values: np.ndarray) -> tuple[str, float] | None:
    """(template, scale c > 0) with values = c·template(grid), else None."""
    for name, (function, _, _) in TEMPLATES.items():
        reference = function(_GRID)
        mask = np.abs(reference) > 1e-6
        ratios = values[mask] / reference[mask]
        scale = float(np.median(ratios))
        if scale > 0 and np.allclose(values, scale * reference, rtol=1e-5, atol=1e-7):
            return name, scale
    return None


def recognize(nodes: list[Node], constants: dict, variable: set[str]) -> list[Node]:
    """Replace every recognized x·g(x) pattern by one GatedActivation node."""
    producer = {out: n for n in nodes for out in n.outputs}
    users: dict[str, int] = {}
    for n in nodes:
        for v in n.inputs:
            users[v] = users.get(v, 0) + 1
    replaced: dict[str, Node] = {}
    removed: set[str] = set()
    for node in nodes:
        if node.op_type != "Mul" or not all(v in variable for v in node.inputs[:2]):
            continue
        found = _match_mul(node, producer, constants)
        if found is None:
            continue
        x, chain, (template, scale) = found
        outputs = list(node.outputs)
        after = _scalar_scaling(node.outputs[0], nodes, constants, users)
        if after is not None:
            removed.add(after[0].name)
            outputs, scale = list(after[0].outputs), scale * after[1]
        replaced[node.name] = Node(
            node.name,
            "GatedActivation",
            "robaudit",
            [x],
            outputs,
            {"template": template, "scale": scale},
            None,
            dict(node.metadata),
        )
        for inner in chain:
            if all(users.get(out, 0) <= 1 for out in inner.outputs):
                removed.add(inner.name)
    return [replaced.get(n.name, n) for n in nodes if n.name not in removed]


def _scalar_scaling(value: str, nodes: list[Node], constants: dict, users: dict) -> tuple[Node, float] | None:
    """The single Mul/Div by a positive scalar constant that follows ``value`` (GELU's ·0.5)."""
    if users.get(value, 0) != 1:
        return None
    consumer = next(n for n in nodes if value in n.inputs)
    if consumer.op_type not in ("Mul", "Div"):
        return None
    others = [v for v in consumer.inputs[:2] if v != value]
    factor = _scalar(constants, others[0]) if len(others) == 1 else None
    if factor is None or factor <= 0 or (consumer.op_type == "Div" and consumer.inputs[1] == value):
        return None
    return consumer, (factor if consumer.op_type == "Mul" else 1.0 / factor)


def _match_mul(node: Node, producer: dict, constants: dict):
    for x, gate in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
        chain = _gate_chain(x, gate, producer, constants)
        if not chain:
            continue
        values, matched = {x: _GRID}, None
        with np.errstate(all="ignore"):
            for inner in chain:
                result = _eval_chain(inner, _GRID, values, constants)
                if result is None:
                    break
                values[inner.outputs[0]] = np.broadcast_to(result, _GRID.shape)
            else:
                matched = match_template(_GRID * values[gate])
            if matched is not None:
                return x, chain, matched
    return None


# --------------------------------------------------------------------------- before the first interval pass


def recognize_early(nodes: list[Node], initializers: dict, input_name: str | set[str]) -> list[Node]:
    """Fuse x / g(x) (Softsign) and PyTorch's thresholded softplus, whose ops have no interval rule.

    Only literal constants are known here (initializers, ``Constant`` nodes); a pattern
    whose constants come out of a longer computation stays as it is, and its ops are
    refused by name later.
    """
    constants = literal_constants(nodes, initializers)
    variable = {input_name} if isinstance(input_name, str) else set(input_name)
    for node in nodes:
        if any(v in variable for v in node.inputs):
            variable.update(node.outputs)
    producer = {out: n for n in nodes for out in n.outputs}
    fused: dict[str, Node] = {}
    members: dict[str, set[str]] = {}
    # the switch first: its softplus branch would otherwise be taken for the legacy form
    for node in nodes:
        if node.op_type == "Where" and len(node.inputs) == 3 and node.inputs[1] in variable:
            _keep(fused, members, node, _match_thresholded_softplus(node, producer, constants))
    taken = set().union(*members.values()) if members else set()
    for node in nodes:
        if node.op_type != "Div" or node.name in taken or len(node.inputs) < 2:
            continue
        if all(v in variable for v in node.inputs[:2]):
            _keep(fused, members, node, _match_div(node, producer, constants))
        elif node.inputs[0] in variable:
            _keep(fused, members, node, _match_scaled_softplus(node, producer, constants))
    removed = _removable(nodes, fused, members)
    return [fused.get(n.name, n) for n in nodes if n.name not in removed]


def _keep(fused: dict, members: dict, node: Node, found: tuple[Node, list[Node]] | None) -> None:
    if found is not None:
        fused[node.name], pattern = found
        members[node.name] = {n.name for n in pattern}


def literal_constants(nodes: list[Node], initializers: dict) -> dict:
    constants = dict(initializers)
    for node in nodes:
        if node.op_type == "Constant" and isinstance(node.attr("value"), np.ndarray):
            constants[node.outputs[0]] = node.attr("value")
        elif node.op_type == "Constant" and node.attr("value_float") is not None:
            constants[node.outputs[0]] = np.array(node.attr("value_float"))
        elif node.op_type in ("Cast", "Identity") and node.inputs and node.inputs[0] in constants:
            constants[node.outputs[0]] = np.asarray(constants[node.inputs[0]])
    return constants


def _removable(nodes: list[Node], fused: dict[str, Node], members: dict[str, set[str]]) -> set[str]:
    """Pattern nodes whose outputs only their own pattern reads (the others stay, and are refused later)."""
    readers: dict[str, set[str]] = {}
    for node in nodes:
        for value in node.inputs:
            readers.setdefault(value, set()).add(node.name)
    removed: set[str] = set()
    by_name = {n.name: n for n in nodes}
    for root, names in members.items():
        inside = names | {root}
        for name in names:
            if all(readers.get(out, set()) <= inside for out in by_name[name].outputs):
                removed.add(name)
    return removed - set(fused)


def _grid_values(x: str, value: str, producer: dict, constants: dict) -> tuple[np.ndarray, list[Node]] | None:
    """``value`` as a function of ``x`` on the grid, and the chain of nodes computing it."""
    chain = _gate_chain(x, value, producer, constants)
    if not chain:
        return None
    values = {x: _GRID}
    with np.errstate(all="ignore"):  # a look-alike may overflow on the grid: it then simply does not match
        for inner in chain:
            result = _eval_chain(inner, _GRID, values, constants)
            if result is None:
                return None
            values[inner.outputs[0]] = np.broadcast_to(result, _GRID.shape)
    return values[value], chain


def _match_div(node: Node, producer: dict, constants: dict) -> tuple[Node, list[Node]] | None:
    """x / g(x) matching c·template (Softsign: g = 1 + |x|)."""
    x, denominator = node.inputs[0], node.inputs[1]
    found = _grid_values(x, denominator, producer, constants)
    if found is None:
        return None
    values, chain = found
    with np.errstate(divide="ignore", invalid="ignore"):
        matched = match_template(_GRID / values)
    if matched is None:
        return None
    template, scale = matched
    attrs = {"template": template, "scale": scale}
    fused = Node(node.name, "GatedActivation", "robaudit", [x], list(node.outputs), attrs, None, dict(node.metadata))
    return fused, chain


def _match_thresholded_softplus(node: Node, producer: dict, constants: dict) -> tuple[Node, list[Node]] | None:
    """``Where(s > t, x, b)`` with s = x or β·x and b(x) = softplus(β·x)/β on the grid."""
    condition, x, otherwise = node.inputs
    greater = producer.get(condition)
    if greater is None or greater.op_type != "Greater" or len(greater.inputs) != 2:
        return None
    threshold = _scalar(constants, greater.inputs[1])
    beta = _beta(x, greater.inputs[0], producer, constants)
    found = _grid_values(x, otherwise, producer, constants)
    if threshold is None or beta is None or found is None:
        return None
    values, chain = found
    if threshold < _MIN_SOFTPLUS_THRESHOLD:
        return None
    exported = np.where(beta * _GRID > threshold, _GRID, values)
    if not np.allclose(exported, _softplus(beta * _GRID) / beta, rtol=1e-6, atol=1e-6):
        return None
    jump = float(np.log1p(np.exp(-threshold)) / beta)
    name = "Softplus" if beta == 1.0 else f"Softplus(beta={beta:g})"
    attrs = {"beta": beta, "threshold": threshold, "jump": jump, "template": name}
    fused = Node(node.name, "ScaledSoftplus", "robaudit", [x], list(node.outputs), attrs, None, dict(node.metadata))
    return fused, [greater, *chain]


#: Lowest switch threshold t accepted: the switch then moves softplus by log(1 + e^(−t)) ≤ 10⁻⁶ (·1/β).
_MIN_SOFTPLUS_THRESHOLD = 14.0


def _match_scaled_softplus(node: Node, producer: dict, constants: dict) -> tuple[Node, list[Node]] | None:
    """``Softplus(β·x) / β`` (the legacy exporter's ``nn.Softplus(beta)``): the neuron is softplus(β·x)/β.

    Without this the ·β would fold into the layer's weights and the /β stay outside it,
    so that a byzantine neuron would send its value before the /β: β times less than
    the module's output it stands for.
    """
    beta = _scalar(constants, node.inputs[1])
    softplus = producer.get(node.inputs[0])
    if beta is None or not beta > 0 or softplus is None or softplus.op_type != "Softplus":
        return None
    scaled = producer.get(softplus.inputs[0])
    if scaled is None or scaled.op_type != "Mul":
        return None
    x = next((v for v in scaled.inputs[:2] if _scalar(constants, v) is None), None)
    if x is None or _beta(x, scaled.outputs[0], producer, constants) != beta:
        return None
    name = f"Softplus(beta={beta:g})"
    attrs = {"beta": beta, "threshold": math.inf, "jump": 0.0, "template": name}
    fused = Node(node.name, "ScaledSoftplus", "robaudit", [x], list(node.outputs), attrs, None, dict(node.metadata))
    return fused, [scaled, softplus]


def _beta(x: str, scaled: str, producer: dict, constants: dict) -> float | None:
    """β when ``scaled`` is x (1) or Mul(x, β) with a positive scalar β."""
    if scaled == x:
        return 1.0
    mul = producer.get(scaled)
    if mul is None or mul.op_type != "Mul" or x not in mul.inputs[:2]:
        return None
    other = mul.inputs[1] if mul.inputs[0] == x else mul.inputs[0]
    beta = _scalar(constants, other)
    return beta if beta is not None and beta > 0 else None
