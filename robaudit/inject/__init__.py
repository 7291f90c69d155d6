"""Fault injection with onnxruntime: instrumenting the model, the contained child process,
campaigns and searches, and replaying a report's fault sets (docs/method.md §7)."""
