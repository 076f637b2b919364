# clipvision server image. CPU torch by default; for CUDA:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t clipvision:cuda .
# and run with --gpus all (torch's CUDA wheels carry their own CUDA runtime).
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CLIPVISION_ADDRESS=0.0.0.0:50051 \
    HF_HOME=/home/clipvision/.cache/huggingface

RUN useradd --create-home --uid 10001 clipvision

WORKDIR /opt/clipvision
# torch first, from the chosen index, so the project's pin finds it installed.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0
COPY pyproject.toml README.md ./
COPY client ./client
COPY server ./server
RUN pip install ".[server]"

USER clipvision
RUN mkdir -p "${HF_HOME}"
VOLUME ["/home/clipvision/.cache/huggingface"]
EXPOSE 50051
ENTRYPOINT ["clipvision-server"]
