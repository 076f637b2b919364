"""The clipvision gRPC server: CLIP embeddings of images and texts, and zero-shot
classification, for any language (EmbeddingService and the Open Inference Protocol)."""
