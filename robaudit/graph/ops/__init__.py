"""Per-op propagation rules, looked up by op type (see ``base.lookup``)."""

from robaudit.graph.ops import activations, affine, gated, pooling, resize, restriction, rounding, shape_ops  # noqa: F401  (registration)
from robaudit.graph.ops.base import Interval, OpRule, PropagationContext, lookup, supported_op_types

__all__ = ["Interval", "OpRule", "PropagationContext", "lookup", "supported_op_types"]
