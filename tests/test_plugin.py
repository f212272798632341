"""The plugin is found through its entry point and vLLM's own loader calls it.

One fresh interpreter (as every vLLM worker process is) runs vLLM's plugin loader, imports
what vLLM imports to serve VTW and reports what it saw; the tests read that report."""

import json
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

FRESH_PROCESS = """
import json, sys
from vllm.plugins import load_general_plugins
load_general_plugins()  # only vLLM's loader runs: nothing of vtw_vllm imported by hand
from vllm import ModelRegistry
from vllm.model_executor.models.config import MODELS_CONFIG_MAP
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry
import torch
from vtw_vllm import ARCHITECTURES
from vtw_vllm.kv_cache import VTWAttentionSpec, VTWManager
spec = VTWAttentionSpec(block_size=16, num_kv_heads=2, head_size=32, dtype=torch.float32)
facts = {
    "architectures": list(ARCHITECTURES),
    "registered": [a for a in ARCHITECTURES if a in ModelRegistry.get_supported_archs()],
    "config_hooks": [a for a in ARCHITECTURES if a in MODELS_CONFIG_MAP],
    "vtw_spec_manager": KVCacheSpecRegistry.get_manager_class(spec) is VTWManager,
}
# vLLM's LLaVA module needs torchvision.transforms.v2 (see scripts/install.sh).
import vllm.model_executor.models.llava
# What vLLM imports to serve VTW (plugin hook, config hook, models, scheduler, worker,
# runner) must not pull in the trainer, the quality task, the fixtures or the tools.
import vtw_vllm.engine_config, vtw_vllm.models.llava_vtw, vtw_vllm.models.llava_video_vtw
import vtw_vllm.models.qwen_vl_vtw
import vtw_vllm.scheduler, vtw_vllm.worker, vtw_vllm.runner, vtw_vllm.validation
research = ("vtw_vllm.quality", "vtw_vllm.testing", "vtw_vllm.calibrate", "vtw_vllm.demo",
            "vtw_vllm.cli", "vtw_vllm.prepare", "vtw_vllm.child_engine")
facts["research_modules_loaded"] = sorted(m for m in sys.modules if m.startswith(research))
facts["torchvision_transforms_v2"] = "torchvision.transforms.v2" in sys.modules
print("FACTS " + json.dumps(facts))
"""


@pytest.fixture(scope="module")
def fresh_process() -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("FACTS ")]
    return json.loads(line.removeprefix("FACTS "))


def test_entry_point_declared():
    names = {ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert "vtw_vllm:register" in names


def test_vllm_loads_plugin_in_fresh_process(fresh_process):
    assert fresh_process["architectures"]
    assert fresh_process["registered"] == fresh_process["architectures"]
    assert fresh_process["config_hooks"] == fresh_process["architectures"]
    assert fresh_process["vtw_spec_manager"]


def test_torchvision_imports(fresh_process):
    assert fresh_process["torchvision_transforms_v2"]


def test_serving_path_imports_no_research_code(fresh_process):
    assert fresh_process["research_modules_loaded"] == []
