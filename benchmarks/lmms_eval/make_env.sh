#!/usr/bin/env bash
# An lmms-eval environment layered over this project's .venv, which stays untouched:
# lmms-eval and its dependencies in ENV's own site-packages, found first; vLLM, torch and
# vtw-vllm from .venv's (a .pth file). lmms-eval 0.7.3 needs filelock < 4 (it imports
# filelock._api); the torchvision fix of scripts/install.sh is carried over.
#   benchmarks/lmms_eval/make_env.sh [ENV]   (default .venv-lmms)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
ENV=${1:-$REPO/.venv-lmms}
site_of() { "$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
MAIN_SITE=$(site_of "$REPO/.venv")
"$REPO/.venv/bin/python" -m venv "$ENV"
SITE=$(site_of "$ENV")
echo "$MAIN_SITE" > "$SITE/vtw_main_env.pth"
for pth in "$MAIN_SITE"/__editable__*vtw_vllm*.pth "$MAIN_SITE"/vtw_torchvision_cpu_fix.pth; do
  if [ -e "$pth" ]; then cp "$pth" "$SITE/zz_$(basename "$pth")"; fi
done
"$ENV/bin/pip" install --quiet "lmms-eval==0.7.3" "filelock<4"
"$ENV/bin/python" -c "import lmms_eval, vllm, vtw_vllm.kernels; print('lmms-eval env ready:', '$ENV')"
