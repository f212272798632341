"""The plugin is found through its entry point and vLLM's own loader calls it."""

import subprocess
import sys
from importlib.metadata import entry_points


def test_entry_point_declared():
    names = {ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert "vtw_vllm:register" in names


def test_vllm_loads_plugin_in_fresh_process():
    # A fresh interpreter, as in every vLLM worker process: only vLLM's loader runs.
    code = (
        "from vllm.plugins import load_general_plugins; load_general_plugins(); "
        "import vtw_vllm; assert vtw_vllm.PLUGIN_STATE['registered']"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_torchvision_imports():
    # vLLM's LLaVA module needs torchvision.transforms.v2 (see scripts/install.sh).
    subprocess.run([sys.executable, "-c", "import vllm.model_executor.models.llava"], check=True)
