# clipvision server image: two stages, non-root, CPU torch by default.
#   docker build -t clipvision:cpu .
# CUDA (torch's CUDA wheels carry their own CUDA runtime; run with --gpus all):
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t clipvision:cuda .
# The install steps are scripts/install_image.sh; scripts/check_image_install.sh runs
# them without Docker. Lint: hadolint Dockerfile (scripts/test does).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY client ./client
COPY server ./server
COPY scripts/install_image.sh ./scripts/
RUN sh scripts/install_image.sh /opt/clipvision /src "${TORCH_INDEX_URL}"

# The runtime stage has the venv and nothing of the build: no sources, no pip cache.
FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/clipvision/bin:$PATH \
    CLIPVISION_ADDRESS=0.0.0.0:50051 \
    CLIPVISION_HTTP_ADDRESS=0.0.0.0:8000 \
    HF_HOME=/cache/huggingface
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /cache clipvision \
    && mkdir -p /cache/huggingface \
    && chown -R 10001:10001 /cache
COPY --from=build /opt/clipvision /opt/clipvision
# Downloaded checkpoints live here: mount a volume so a restart does not download again.
VOLUME ["/cache"]
USER 10001:10001
# gRPC, and HTTP (OpenAI's /v1/embeddings, KServe v2 REST, Weaviate, JSON).
EXPOSE 50051 8000
# Docker has no native gRPC probe: ask grpc.health.v1 (SERVING once the model is warm).
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["clipvision-healthcheck", "--timeout", "4"]
ENTRYPOINT ["clipvision-server"]
