"""The op registry: one rule object per ONNX op type, looked up by (domain, op_type).

Everything robaudit knows about an op lives in its rule class (docs/method.md §3.2):

* ``op_types``/``domain``: what it is registered under;
* ``attributes``: the attribute types ONNX declares for it, checked when the graph is
  decoded (:mod:`robaudit.graph.onnx_graph`);
* ``role``: whether it anchors a layer, closes one (an activation) or sits between;
* ``interval``: interval bound propagation of the clean network;
* ``backward``: the absolute-value adjoint used by the tight bound — given the
  sensitivities ``cot`` of the outputs ([K, *shape]), the sensitivities of each
  variable input, such that |Δout| ≤ cot-weighted |Δin| holds elementwise;
* ``paper``: how a bound E on the *sum* of absolute deviations of its inputs
  becomes one for its output.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from onnx import AttributeProto

from robaudit.errors import ModelStructureError, UnsupportedModelError

if TYPE_CHECKING:
    from robaudit.graph.onnx_graph import Node


@dataclass
class Interval:
    """Elementwise bounds ``lo ≤ x ≤ hi`` of one tensor (batch dimension 1 included)."""

    lo: np.ndarray
    hi: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        """The tensor's shape."""
        return tuple(self.lo.shape)

    def abs_max(self) -> np.ndarray:
        """Elementwise bound on |x|."""
        return np.maximum(np.abs(self.lo), np.abs(self.hi))

    @staticmethod
    def point(value: np.ndarray) -> Interval:
        """The degenerate interval of a constant."""
        array = np.asarray(value, dtype=np.float64)
        return Interval(array, array)


class Probabilities(Interval):
    """The box of a value whose every row along the last axis is a probability vector (entries ≥ 0 summing to 1)
    at every point of the domain, clean or faulty: a Softmax's output normalized along its last axis, made only by
    its rule (docs/method.md §13.3). Every other op builds a plain :class:`Interval`, so the claim is never carried
    to another value."""


@dataclass
class NormalizedRows(Interval):
    """The box of a normalization's output γ⊙z + β normalized along its last axis alone: each row z of its n
    elements has ‖z‖₂ ≤ √n, and Σ z = 0 when ``centred`` (LayerNorm; RMSNorm is not), at every point of the domain,
    clean or faulty. Made by the normalization rule and kept, with their own γ and β, by the elementwise maps by
    constants along the last axis (docs/method.md §13.1); every other op builds a plain :class:`Interval`, so the
    claim is never carried to another value."""

    #: γ and β along the last axis, [n].
    gamma: np.ndarray = field(default_factory=lambda: np.ones(0))
    beta: np.ndarray = field(default_factory=lambda: np.zeros(0))
    centred: bool = True


#: What an op sees of one input: an Interval (variable), an ndarray (constant) or None (absent).
Arg = Any


class PropagationContext:
    """What ``backward`` and ``paper`` may look up: intervals and constants by value name.

    With ``use_ranges`` the backward rules may use what the intervals say about each
    element (docs/method.md §4.3): an activation's slope over the hull of the element's
    clean and faulty-network intervals, the window elements that can be a max-pool's
    maximum. That is sound only for deviations whose both ends lie in those intervals —
    the failures the faulty intervals were computed for.
    """

    def __init__(
        self,
        clean: dict[str, Interval],
        faulty: dict[str, Interval],
        constants: dict[str, np.ndarray],
        use_ranges: bool = False,
        floors: dict[str, tuple[Interval, np.ndarray]] | None = None,
    ) -> None:
        self.clean = clean
        self.faulty = faulty
        self.constants = constants
        self.use_ranges = use_ranges
        #: Per normalization node: (the clean box of its input it was computed for, a floor of σ per group).
        self.floors = floors or {}
        self._slopes: dict[str, np.ndarray] = {}
        self._memo: dict[tuple, Any] = {}
        # the tight pass back-propagates chunks of outputs in several threads sharing this context
        self._lock = threading.RLock()

    def __getstate__(self) -> dict:
        """Picklable and deep-copyable: the lock is made again on load."""
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def memo(self, key: tuple, make: Callable[[], Any]) -> Any:
        """``make()``, computed once per ``key`` for this context: its intervals and constants do not change
        while it is used, so what is derived from them alone is the same for every chunk of a backward
        pass (docs/method.md §4.4). Safe to call from several threads."""
        with self._lock:
            if key not in self._memo:
                self._memo[key] = make()
            return self._memo[key]

    def hull(self, value: str) -> Interval:
        """The smallest interval holding ``value``'s clean and faulty-network intervals."""
        clean, faulty = self.clean[value], self.faulty.get(value, self.clean[value])
        return Interval(np.minimum(clean.lo, faulty.lo), np.maximum(clean.hi, faulty.hi))

    def slope(self, node: Node, rule: Any) -> np.ndarray:
        """The activation ``node``'s largest slope over the hull of its input (cached by node name; safe to
        call from several threads)."""
        with self._lock:
            if node.name not in self._slopes:
                box = self.hull(node.inputs[0])
                self._slopes[node.name] = np.asarray(rule.max_slope(node, box.lo, box.hi, self.constants), np.float64)
            return self._slopes[node.name]

    def shape(self, value: str) -> tuple[int, ...]:
        """Shape of a variable or constant value."""
        if value in self.clean:
            return self.clean[value].shape
        return tuple(np.shape(self.constants[value]))

    def is_variable(self, value: str) -> bool:
        """Whether ``value`` depends on the network input."""
        return value in self.clean


#: ONNX attribute types (``onnx.AttributeProto`` values) used in the ``attributes`` tables.
FLOAT, INT, STRING, TENSOR = AttributeProto.FLOAT, AttributeProto.INT, AttributeProto.STRING, AttributeProto.TENSOR
SPARSE_TENSOR, FLOATS, INTS, STRINGS = (
    AttributeProto.SPARSE_TENSOR,
    AttributeProto.FLOATS,
    AttributeProto.INTS,
    AttributeProto.STRINGS,
)
#: The type ONNX declares for one attribute, or the types it declared in different opsets.
AttrTypes = int | tuple[int, ...]
#: op type → attribute name → declared type(s).
AttributeTable = Mapping[str, Mapping[str, AttrTypes]]


class Role(StrEnum):
    """Where an op sits in a layer (docs/method.md §1.1)."""

    #: A variable input times constant weights: it starts a layer (Gemm, MatMul, Conv, ConvTranspose).
    AFFINE = "affine"
    #: An element-wise function with a Lipschitz constant that closes a layer.
    ACTIVATION = "activation"
    #: Any other op: between layers (shape ops, pooling, residual sums, …).
    BETWEEN = "between"


#: Python errors a rule raises when a node's attributes or inputs take a form it does
#: not handle (a missing attribute, an input absent, an unexpected rank).
_FORM_ERRORS = (IndexError, KeyError, TypeError, AttributeError, NotImplementedError)
_GUARDED = ("interval", "backward", "paper")


def describe_form(node: Node) -> str:
    """``attributes mode, scales; 1 input, 2 outputs``: what a refused form of an op looks like."""
    attrs = ", ".join(sorted(node.attrs)) or "none"
    inputs, outputs = sum(1 for v in node.inputs if v), sum(1 for v in node.outputs if v)
    return f"attributes {attrs}; {inputs} input{'s' * (inputs != 1)}, {outputs} output{'s' * (outputs != 1)}"


def _guarded(method: Callable[..., Any], name: str) -> Callable[..., Any]:
    """Wrap a rule method so a form it does not handle is one :func:`unsupported` error.

    ``interval`` leaves ValueError/ZeroDivisionError to its caller, which names the
    shapes; ``backward`` and ``paper`` run after the shapes were checked, so every
    error there is a form they do not handle.
    """
    errors = _FORM_ERRORS if name == "interval" else (*_FORM_ERRORS, ValueError, ZeroDivisionError)

    @functools.wraps(method)
    def wrapper(self: OpRule, node: Node, *args: Any) -> Any:
        try:
            return method(self, node, *args)
        except errors:
            raise unsupported(node, f"this form of the op is not supported ({describe_form(node)})") from None

    wrapper.__robaudit_guarded__ = True  # type: ignore[attr-defined]
    return wrapper


class OpRule:
    """Base rule: every capability refuses until a subclass provides it.

    Rules hold no per-node state: every method reads what it needs from the node and
    its arguments, so one instance serves every node (and every thread).

    Subclasses' ``interval``/``backward``/``paper`` are wrapped by :func:`_guarded`: an
    attribute or input form a rule does not handle reaches the user as one line naming
    op, node and form, never as a Python exception text.
    """

    op_types: ClassVar[tuple[str, ...]] = ()
    domain: ClassVar[str] = ""
    role: ClassVar[Role] = Role.BETWEEN
    #: Per op type, the attribute types ONNX declares for it in any opset version (every
    #: op type of a default-domain rule is listed, ``{}`` when it has no attributes).
    attributes: ClassVar[AttributeTable] = {}
    #: Whether the rule's slope depends on its input's range under failures (docs/method.md §3.2).
    range_dependent: ClassVar[bool] = False

    def shown(self, node: Node) -> str:
        """How reports name ``node``: its op type, or for a node robaudit fused from several the ONNX ops the model
        holds."""
        return node.op_type

    def uses_faulty_range(self, node: Node, variable: set[str]) -> bool:
        """Whether ``backward``/``paper`` read ``ctx.faulty`` for ``node`` (``variable``: input-dependent values)."""
        return self.range_dependent

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in _GUARDED:
            method = cls.__dict__.get(name)
            if method is not None and not getattr(method, "__robaudit_guarded__", False):
                setattr(cls, name, _guarded(method, name))

    def interval(self, node: Node, args: list[Arg]) -> list[Interval]:
        """Interval bound propagation; subclasses override."""
        raise unsupported(node, "is not supported on the audited path")

    def backward(self, node: Node, cot: list[np.ndarray | None], ctx: PropagationContext) -> list[np.ndarray | None]:
        """Absolute-value adjoint; subclasses override."""
        raise unsupported(node, "has no error-propagation rule")

    def paper(self, node: Node, errs: list[float | None], ctx: PropagationContext) -> list[float]:
        """Sum-of-deviations propagation (docs/method.md §3.2 'Ops between layers')."""
        raise unsupported(node, "has no error-propagation rule")


def broadcast_scalar(value: Any) -> float | None:
    """The number of a constant that broadcasting never widens: one element on at most one axis (against a value of
    rank ≥ 1 it leaves that value's shape). None otherwise — also for one element on several axes, which widens a
    value of lower rank: [1, 1, 1] against [1, 2] gives [1, 1, 2] (an attack helper's finding: a rule that read it as
    a number kept [1, 2], and a later ReduceSum over axis 1 summed the wrong elements)."""
    if value is None or np.size(value) != 1 or np.ndim(value) > 1:
        return None
    return float(np.asarray(value, np.float64).reshape(-1)[0])


def unsupported(node: Node, reason: str) -> UnsupportedModelError:
    """The one error for an op robaudit cannot bound: names op, domain and node (for a node robaudit fused from
    several, the ops the model holds, as reports name it: :meth:`OpRule.shown`)."""
    fused = _REGISTRY.get((node.domain, node.op_type)) if node.domain == "robaudit" else None
    if fused is not None:
        shown, domain = fused.shown(node), ""
    else:
        shown, domain = node.op_type, f" (domain '{node.domain}')" if node.domain not in ("", "ai.onnx") else ""
    return UnsupportedModelError(
        f"unsupported op '{shown}'{domain} at node '{node.name}' on the audited path: {reason}",
        op_type=node.op_type,
        node=node.name,
    )


_REGISTRY: dict[tuple[str, str], OpRule] = {}
#: Attribute types of ops that never reach a rule (folded away before the audit).
_FOLDED_ATTRIBUTES: dict[str, Mapping[str, AttrTypes]] = {}


def register(rule_class: type[OpRule]) -> type[OpRule]:
    """Class decorator: register one instance of the rule under each of its op types.

    Raises:
        ValueError: another rule class already handles one of its op types (two rules
            for one op would make the result depend on the import order).
    """
    rule = rule_class()
    for op_type in rule_class.op_types:
        key = (rule_class.domain, op_type)
        other = _REGISTRY.get(key)
        if other is not None and _qualified(type(other)) != _qualified(rule_class):
            raise ValueError(f"op '{op_type}' has two rules: {_qualified(type(other))} and {_qualified(rule_class)}")
        _REGISTRY[key] = rule
    return rule_class


def unregister(rule_class: type[OpRule]) -> None:
    """Remove a rule class from the registry (tests that add a toy op)."""
    for op_type in rule_class.op_types:
        if type(_REGISTRY.get((rule_class.domain, op_type))) is rule_class:
            del _REGISTRY[(rule_class.domain, op_type)]


def declare_folded(table: AttributeTable) -> None:
    """Record the attribute types of ops that only constant folding evaluates (no rule)."""
    _FOLDED_ATTRIBUTES.update(table)


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def attribute_types(domain: str, op_type: str) -> Mapping[str, AttrTypes]:
    """The declared attribute types of an op ({} when robaudit knows none: custom domains, unknown ops)."""
    domain = "" if domain in ("", "ai.onnx") else domain
    rule = _REGISTRY.get((domain, op_type))
    if rule is not None and op_type in rule.attributes:
        return rule.attributes[op_type]
    return _FOLDED_ATTRIBUTES.get(op_type, {}) if domain == "" else {}


def attribute_table() -> dict[str, Mapping[str, AttrTypes]]:
    """Every default-domain op's declared attribute types, from the rules and the folded ops."""
    table = dict(_FOLDED_ATTRIBUTES)
    for (domain, op_type), rule in _REGISTRY.items():
        if domain == "" and op_type in rule.attributes:
            table[op_type] = rule.attributes[op_type]
    return table


def lookup(node: Node) -> OpRule | None:
    """The rule for ``node`` or None."""
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    return _REGISTRY.get((domain, node.op_type))


def uses_faulty_ranges(nodes: list[Node], variable: set[str]) -> bool:
    """Whether some op's rule reads its input's range under failures (then even a chain needs it)."""
    for node in nodes:
        rule = lookup(node)
        if rule is not None and rule.uses_faulty_range(node, variable):
            return True
    return False


def rule_for(node: Node) -> OpRule:
    """The rule for ``node``.

    Raises:
        UnsupportedModelError: no rule handles the node's op.
    """
    rule = lookup(node)
    if rule is None:
        raise unsupported(node, "has no error-propagation rule")
    return rule


def supported_op_types() -> list[str]:
    """Sorted op types with a propagation rule (for the README and ``inspect``)."""
    return sorted({op for (_, op), rule in _REGISTRY.items() if type(rule).interval is not OpRule.interval})


#: Largest tensor (elements, batch 1) an op on the audited path may produce.
MAX_VALUE_ELEMENTS = 2**26


def check_size(node: Node, shape) -> None:
    """Refuse an op whose output would exceed :data:`MAX_VALUE_ELEMENTS`, before allocating it."""
    count = float(np.prod([float(d) for d in shape])) if len(shape) else 1.0
    if count > MAX_VALUE_ELEMENTS:
        raise ModelStructureError(
            f"node {node.describe()} would produce a tensor of {count:.3g} elements per sample, over the size limit"
        )


def reduce_to_shape(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum a [K, *broadcast_shape] array down to [K, *shape] (adjoint of broadcasting)."""
    lead = array.ndim - 1 - len(shape)
    if lead > 0:
        array = array.sum(axis=tuple(range(1, 1 + lead)))
    axes = tuple(i + 1 for i, size in enumerate(shape) if size == 1 and array.shape[i + 1] != 1)
    if axes:
        array = array.sum(axis=axes, keepdims=True)
    return array.reshape((array.shape[0],) + tuple(shape))


def replication(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> float:
    """How many output elements one input element is broadcast to."""
    return float(np.prod(out_shape)) / max(float(np.prod(in_shape)), 1.0)
