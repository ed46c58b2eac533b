"""Applications built on the package: command line, browser demo, demo run, model cards, ONNX export."""
