#!/usr/bin/env bash
# Wheels that scripts/gpu_check.sh installs on a lent GPU machine, whose image (Python 3.12,
# PyTorch, Lightning, timm) lacks Hydra. Run here, once, before the device call that carries
# `.whl`; the folder is ignored by git (.git/info/exclude).
set -euo pipefail
cd "$(dirname "$0")/.."
exclude="$(git rev-parse --git-common-dir)/info/exclude"
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
mkdir -p .whl
py=.venv/bin/python
[ -x "$py" ] || py=python3
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d .whl \
    hydra-core==1.3.8 omegaconf==2.3.1
# antlr4-python3-runtime (Hydra's parser) ships as a source archive only: build its wheel
"$py" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -1 .whl
