"""The models and what runs them: the registry, model families, checkpoints (random weights
too), exact preprocessing, the image and text encoders, the backends (torch, ONNX Runtime),
the batcher and the label cache."""
