#!/usr/bin/env bash
# Build the Docker image with buildah (no Docker engine needed) and train one epoch in it as a
# non-root user, the outputs mounted from the host:
#
#   sudo bash scripts/docker_check.sh [OUT_DIR]      # default OUT_DIR: ./outputs/docker_check
#
# Needs Debian's buildah and debootstrap (apt-get install buildah debootstrap) and root. The
# PyTorch base image cannot be pulled here, so a local stand-in is built first: Debian bookworm
# from debootstrap with python3, pip and torch/torchvision as constraints-torch.txt pins them
# (the CPU run below does not need the base image's CUDA). It is passed as the Dockerfile's
# BASE_IMAGE and kept between runs (delete it with `buildah rmi localhost/q8-base`). pip's
# local package folders and configuration, where this machine has them, are mounted into the
# builds. Prints the run's metrics.json and exits 0 when the run wrote it as UID 1234.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${1:-outputs/docker_check}
BASE=localhost/q8-base
IMAGE=localhost/q8
RUN_UID=1234
for tool in buildah debootstrap; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found (apt-get install $tool)" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "error: run as root (buildah --isolation chroot, debootstrap)" >&2; exit 2; }

# pip's configuration, local indexes and CA certificates on this machine, visible to the builds
volumes=()
for path in /etc/pip.conf /etc/xdg/pip /etc/ssl/certs/ca-certificates.crt /opt/wheels /opt/pypi \
    /opt/pypi-more; do
    if [ -e "$path" ]; then volumes+=(--volume "$path:$path:ro"); fi
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
    echo "== base image $BASE: debootstrap bookworm, python3, pip, torch"
    debootstrap --variant=minbase --include=python3,python3-pip,python-is-python3,ca-certificates \
        bookworm "$work/rootfs" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 \
        || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
    # the PyTorch image's Python is not Debian's externally managed one: pip installs into it
    rm -f "$work"/rootfs/usr/lib/python3*/EXTERNALLY-MANAGED
    rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb
    tar -C "$work/rootfs" -cf "$work/rootfs.tar" .
    cp constraints-torch.txt "$work/"
    cat >"$work/Containerfile" <<'EOF'
FROM scratch
ADD rootfs.tar /
COPY constraints-torch.txt /tmp/
RUN python -m pip install --no-cache-dir -c /tmp/constraints-torch.txt torch torchvision
EOF
    buildah bud --isolation chroot "${volumes[@]}" -t "$BASE" "$work"
fi

echo "== image $IMAGE from the Dockerfile, BASE_IMAGE=$BASE"
start=$(date +%s)
buildah bud --isolation chroot "${volumes[@]}" \
    --build-arg BASE_IMAGE="$BASE" -t "$IMAGE" .
echo "built in $(($(date +%s) - start)) s"

echo "== one epoch in the image as UID $RUN_UID, outputs in $OUT_DIR"
mkdir -p "$OUT_DIR"
chown "$RUN_UID:$RUN_UID" "$OUT_DIR"
container=$(buildah from "$IMAGE")
trap 'buildah rm "$container" >/dev/null; rm -rf "$work"' EXIT
buildah run --isolation chroot --user "$RUN_UID:$RUN_UID" \
    --volume "$(realpath "$OUT_DIR"):/workspace/outputs" --env WANDB_MODE=offline "$container" -- \
    python train.py trainer.max_epochs=1 trainer.limit_train_batches=4 trainer.limit_val_batches=2 \
    trainer.limit_test_batches=2 model=timm model.name=test_resnet data.image_size=16 \
    hydra.run.dir=/workspace/outputs/run
metrics="$OUT_DIR/run/metrics.json"
[ -f "$metrics" ] || { echo "error: the run wrote no $metrics" >&2; exit 1; }
owner=$(stat -c %u "$metrics")
[ "$owner" = "$RUN_UID" ] || { echo "error: $metrics is owned by UID $owner" >&2; exit 1; }
cat "$metrics"
echo "ok: one epoch trained in $IMAGE as UID $RUN_UID"
