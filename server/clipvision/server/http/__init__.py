"""HTTP beside gRPC, on the same event loop: OpenAI's embeddings, the Open Inference Protocol's
REST form, Weaviate's multi2vec-clip module API and JSON (Connect unary) for EmbeddingService;
thin routes over the same data planes, with the same limits, deadlines, metrics and logs."""
