"""Fault injection with onnxruntime: instrumenting the model, the contained child process,
campaigns and searches, and replaying a report's fault sets (docs/method.md §8).

The Python API function is :func:`robaudit.inject` (``robaudit.api.inject``); this package
is named ``injection`` so that the two never shadow each other.
"""
