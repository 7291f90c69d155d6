"""From an ONNX file to the layer graph: safe loading, the checked IR, constant folding,
the op rules (interval propagation and error propagation per op) and the grouping of
affine ops with their activations into failure sites (docs/method.md §1)."""
