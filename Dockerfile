# q8 training image: `docker build -t q8 .` then
#   docker run --gpus all -v $PWD/outputs:/workspace/outputs -v /data:/data -e Q8_DATA_DIR=/data \
#     q8 experiment=imagenet_resnet18
# Runs as any user (docker run --user $(id -u)): HOME and /workspace are writable by all.
ARG BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV HOME=/tmp \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    WANDB_CONFIG_DIR=/tmp/wandb-config \
    WANDB_CACHE_DIR=/tmp/wandb-cache

WORKDIR /workspace

# The same install as `make setup`: the project from pyproject.toml, editable. The base image's
# torch satisfies torch>=2.3, so pip keeps it (and its CUDA build).
COPY pyproject.toml README.md ./
COPY q8/ q8/
COPY callbacks/ callbacks/
RUN pip install --no-cache-dir -e . && chmod -R a+rwX /workspace

COPY . .
RUN mkdir -p outputs data && chmod -R a+rwX /workspace

ENTRYPOINT ["python", "train.py"]
