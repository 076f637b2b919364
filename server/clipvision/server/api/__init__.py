"""The protocols: EmbeddingService and the Open Inference Protocol, thin handlers that turn
messages into calls on the pipelines and results back into messages; ordered streams."""
