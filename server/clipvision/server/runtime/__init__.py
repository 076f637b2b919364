"""The models and what runs them: the registry, checkpoints, exact preprocessing, the image
and text encoders, the backends (torch, ONNX Runtime), the batcher and the label cache."""
