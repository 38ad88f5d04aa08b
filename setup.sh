#!/usr/bin/env bash
# One-step setup: the Fashion-MNIST files (Debian package) and the project with its tested pins.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist \
        || echo "warning: could not install dataset-fashion-mnist; set data.root or data.download=true" >&2
fi
python -m pip install -c constraints.txt -e ".[dev,onnx,timm]"
