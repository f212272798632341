"""Fails loudly when vLLM changes what vtw_vllm relies on (see vtw_vllm/vllm_patches.py)."""

import inspect

from vllm.config import VllmConfig
from vllm.model_executor.models import config as models_config
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.worker import cpu_worker
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.utils import AttentionGroup

from vtw_vllm import ARCHITECTURES, register
from vtw_vllm.vllm_patches import cpu_worker_runner_class


def test_model_config_hook_table():
    assert isinstance(models_config.MODELS_CONFIG_MAP, dict)
    assert "MODELS_CONFIG_MAP" in inspect.getsource(VllmConfig.try_verify_and_update_config)
    register()
    for arch in ARCHITECTURES:
        assert hasattr(models_config.MODELS_CONFIG_MAP[arch], "verify_and_update_config")


def test_cpu_worker_builds_runner_from_module_name():
    source = inspect.getsource(cpu_worker.CPUWorker.init_device)
    assert "CPUModelRunner(self.vllm_config" in source
    original = cpu_worker.CPUModelRunner
    with cpu_worker_runner_class(object):
        assert cpu_worker.CPUModelRunner is object
    assert cpu_worker.CPUModelRunner is original


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_overridden_vllm_methods_keep_their_signatures():
    # Runner methods the VTW mixin wraps.
    assert _params(GPUModelRunner._prepare_inputs)[:3] == [
        "self",
        "scheduler_output",
        "num_scheduled_tokens",
    ]
    assert _params(GPUModelRunner._get_slot_mappings)[:4] == [
        "self",
        "num_tokens_padded",
        "num_reqs_padded",
        "num_tokens_unpadded",
    ]
    for name in ("_model_forward", "execute_model", "initialize_attn_backend"):
        assert callable(getattr(GPUModelRunner, name))
    assert _params(AttentionGroup.build_metadata)[:4] == [
        "self",
        "common_attn_metadata",
        "ubatch_idx",
        "common_prefix_len",
    ]
    # KV manager methods the VTW manager translates.
    assert _params(FullAttentionManager.get_num_blocks_to_allocate) == [
        "self",
        "request_id",
        "num_tokens",
        "new_computed_blocks",
        "total_computed_tokens",
        "num_local_computed_tokens",
        "num_tokens_main_model",
        "apply_admission_cap",
        "prefill_end",
    ]
    assert _params(FullAttentionManager.allocate_new_blocks) == [
        "self",
        "request_id",
        "num_tokens",
        "num_tokens_main_model",
    ]
