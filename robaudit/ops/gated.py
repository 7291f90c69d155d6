"""Activations exported as subgraphs: x · g(x) (SiLU, GELU, HardSwish, Mish).

Exporters often write ``x * Sigmoid(x)`` or ``x * 0.5 * (1 + Erf(x / √2))`` instead of a
single op. A product of two variable tensors would otherwise be bounded by the loose
product rule; here the whole pattern x · g(x) — g a chain of element-wise ops of x
alone — is evaluated on a grid and matched against known functions, and when it
matches c·template (c > 0) it is treated as one activation with Lipschitz c·K.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from robaudit.onnx_graph import Node
from robaudit.ops.activations import _ERF, Activation, _sigmoid, _softplus
from robaudit.ops.base import Interval, lookup, register

#: name → (function, global Lipschitz constant (SPEC §3 table), argmin of the function)
TEMPLATES: dict[str, tuple[Callable[[np.ndarray], np.ndarray], float, float]] = {
    "SiLU": (lambda x: x * _sigmoid(x), 1.1, -1.2784645),
    "Gelu": (lambda x: 0.5 * x * (1.0 + _ERF(x / math.sqrt(2.0))), 1.13, -0.7517916),
    "GeluTanh": (
        lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))),
        1.13,
        -0.7522,
    ),
    "HardSwish": (lambda x: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0), 1.5, -1.5),
    "Mish": (lambda x: x * np.tanh(_softplus(x)), 1.09, -1.1924),
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
}


@register
class GatedActivation(Activation):
    """The synthetic op that replaces a recognized x·g(x) subgraph."""

    op_types = ("GatedActivation",)
    domain = "robaudit"

    def lipschitz(self, node: Node) -> float:
        return node.attr("scale") * TEMPLATES[node.attr("template")][1]

    def function(self, node: Node, x: np.ndarray) -> np.ndarray:
        return node.attr("scale") * TEMPLATES[node.attr("template")][0](np.asarray(x, np.float64))

    def interval(self, node, args):
        self.minimum_at = TEMPLATES[node.attr("template")][2]
        return super().interval(node, args)


def _scalar(constants: dict, name: str) -> float | None:
    value = constants.get(name)
    if value is None or np.size(value) != 1:
        return None
    return float(np.asarray(value, np.float64).reshape(-1)[0])


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
        values = {x: _GRID}
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
