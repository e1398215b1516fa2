# q8 training image (README, "GPU and cluster"):
#   docker build -t q8 .
#   docker run --gpus all --user "$(id -u):$(id -g)" -v "$PWD/outputs:/workspace/outputs" \
#       -v /datasets:/data -e Q8_DATA_DIR=/data q8 experiment=imagenet_resnet18
# Any UID works (docker --user, Apptainer, pyxis): HOME, caches and W&B's directories are under
# /tmp, and /workspace is writable by everyone. Arguments are Hydra overrides for train.py.
ARG BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# USER/LOGNAME: getpass.getuser() (torch.compile's cache, W&B) fails for a UID without a passwd
# entry unless they are set.
ENV HOME=/tmp \
    USER=q8 \
    LOGNAME=q8 \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    TRITON_CACHE_DIR=/tmp/.triton \
    MPLCONFIGDIR=/tmp/matplotlib \
    WANDB_CONFIG_DIR=/tmp/wandb-config \
    WANDB_CACHE_DIR=/tmp/wandb-cache \
    WANDB_DATA_DIR=/tmp/wandb-data \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# data=fashion_mnist reads Debian's and Ubuntu's package (its files, not a download). Unpinned: the
# base image's distribution release fixes the version.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace

# The install of `make setup`, which CI runs (.ci/run): the project and its `app` and `dev` extras from
# pyproject.toml, editable, with the versions CI ran (constraints.txt), but for torch: the base
# image's CUDA build satisfies pyproject's torch range, so pip keeps it
# (tests/test_distributed.py checks that the two commands agree).
COPY pyproject.toml README.md constraints.txt ./
COPY q8/ q8/
RUN python -m pip install -c constraints.txt -e '.[app,dev]' && chmod -R a+rwX /workspace

# The application runs from /workspace as from a checkout: train.py, conf/ and callbacks/ (not
# installed: `python train.py` imports callbacks/ from the script's folder).
COPY . .
RUN mkdir -p outputs data && chmod -R a+rwX /workspace

ENTRYPOINT ["python", "train.py"]
