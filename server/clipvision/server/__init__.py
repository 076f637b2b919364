"""The clipvision gRPC server: CLIP image embeddings for any language."""
