"""Bounds on the output error under neuron failures: the paper's Forward Error Propagation,
the tight sensitivity bound, the inverse problems, and the library entry points behind
``inspect`` and ``bound`` (docs/method.md §3–5)."""
