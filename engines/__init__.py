"""The heatmap model: ONNX export from shipped weights and the runtimes that run it."""
