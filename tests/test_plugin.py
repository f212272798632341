"""The plugin is found through its entry point and vLLM's own loader calls it."""

import subprocess
import sys
from importlib.metadata import entry_points


def test_entry_point_declared():
    names = {ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert "vtw_vllm:register" in names


def test_vllm_loads_plugin_in_fresh_process():
    # A fresh interpreter, as in every vLLM worker process: only vLLM's loader runs.
    code = """
from vllm.plugins import load_general_plugins
load_general_plugins()
from vllm import ModelRegistry
from vllm.model_executor.models.config import MODELS_CONFIG_MAP
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry
from vtw_vllm import ARCHITECTURES
from vtw_vllm.kv_cache import VTWAttentionSpec, VTWManager
for arch in ARCHITECTURES:
    assert arch in ModelRegistry.get_supported_archs(), arch
    assert arch in MODELS_CONFIG_MAP, arch
import torch
spec = VTWAttentionSpec(block_size=16, num_kv_heads=2, head_size=32, dtype=torch.float32)
assert KVCacheSpecRegistry.get_manager_class(spec) is VTWManager
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def test_torchvision_imports():
    # vLLM's LLaVA module needs torchvision.transforms.v2 (see scripts/install.sh).
    subprocess.run([sys.executable, "-c", "import vllm.model_executor.models.llava"], check=True)


def test_serving_path_imports_no_research_code():
    # What vLLM imports to serve VTW (plugin hook, config hook, models, scheduler, worker,
    # runner) must not pull in the trainer, the quality task, the fixtures or the tools.
    code = """
import sys
from vllm.plugins import load_general_plugins
load_general_plugins()
import vtw_vllm.engine_config, vtw_vllm.models.llava_vtw, vtw_vllm.models.llava_video_vtw
import vtw_vllm.scheduler, vtw_vllm.worker, vtw_vllm.runner, vtw_vllm.validation
research = ("vtw_vllm.quality", "vtw_vllm.testing", "vtw_vllm.calibrate", "vtw_vllm.demo",
            "vtw_vllm.cli", "vtw_vllm.prepare", "vtw_vllm.child_engine")
loaded = sorted(m for m in sys.modules if m.startswith(research))
assert not loaded, loaded
"""
    subprocess.run([sys.executable, "-c", code], check=True)
