#!/usr/bin/env bash
# Set up everything on a fresh machine: .venv with torch, this project and its test tools, and
# .venv-labelstudio with the Label Studio server the demo and the tests start locally. Safe to re-run.
# Override the torch build with TORCH_PACKAGES="torch==X torchvision==Y".
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
# torch first, pinned: these builds are on the project's machines' disks (x86_64 / aarch64); an unpinned
# torch would pull a multi-gigabyte CUDA build from the network.
if [ -z "${TORCH_PACKAGES:-}" ]; then
    case "$(uname -m)" in
        aarch64|arm64) TORCH_PACKAGES="torch==2.9.1 torchvision==0.24.1" ;;
        *) TORCH_PACKAGES="torch==2.14.1 torchvision==0.29.1" ;;
    esac
fi
# shellcheck disable=SC2086
.venv/bin/pip install --quiet --disable-pip-version-check $TORCH_PACKAGES
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
# Label Studio runs as a separate process from its own venv: its pinned web stack need not agree with torch's.
if [ ! -x .venv-labelstudio/bin/label-studio ]; then
    "$python" -m venv .venv-labelstudio
fi
.venv-labelstudio/bin/pip install --quiet --disable-pip-version-check "label-studio==${LABEL_STUDIO_VERSION:-1.23.2}"
.venv/bin/python -c "import torch, torchvision, pipeline; print('setup: ok, torch', torch.__version__)"
.venv-labelstudio/bin/python -c "import label_studio; print('setup: ok, label-studio', label_studio.__version__)"
