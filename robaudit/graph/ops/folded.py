"""Ops that never reach a rule: constant folding evaluates them before the audit
(:mod:`robaudit.graph.folding`); only their attribute types are declared here, so that
the graph decoder checks them like every other op's."""

from __future__ import annotations

from robaudit.graph.ops.base import FLOAT, FLOATS, INT, INTS, SPARSE_TENSOR, STRING, STRINGS, TENSOR, declare_folded

declare_folded(
    {
        "Constant": {
            "sparse_value": SPARSE_TENSOR,
            "value": TENSOR,
            "value_float": FLOAT,
            "value_floats": FLOATS,
            "value_int": INT,
            "value_ints": INTS,
            "value_string": STRING,
            "value_strings": STRINGS,
        },
        "ConstantOfShape": {"value": TENSOR},
        "DequantizeLinear": {"axis": INT, "block_size": INT, "output_dtype": INT},
        "Shape": {"end": INT, "start": INT},
    }
)
