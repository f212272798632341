"""Fails loudly when vLLM changes what vtw_vllm relies on (see vtw_vllm/vllm_patches.py)."""

import inspect

import torch
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


def test_front_end_and_engine_core_wrappers():
    """Patches 3 and 5: the wrapped methods exist with the arguments the wrappers use,
    and registering twice wraps once."""
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.engine.input_processor import InputProcessor

    register()
    register()
    assert getattr(InputProcessor.process_inputs, "_vtw_wrapped", False)
    assert getattr(EngineCore.preprocess_add_request, "_vtw_wrapped", False)
    assert _params(InputProcessor.process_inputs.__wrapped__)[:4] == [
        "self",
        "request_id",
        "prompt",
        "params",
    ]
    assert _params(EngineCore.preprocess_add_request.__wrapped__) == ["self", "request"]
    # The front-end cache's recovery path the wrapper calls.
    from vllm.multimodal.cache import BaseMultiModalProcessorCache

    assert callable(BaseMultiModalProcessorCache.invalidate)
    # The engine core turns a preprocessing exception into that request's error output.
    from vllm.v1.engine.core import EngineCoreProc

    source = inspect.getsource(EngineCoreProc)
    assert "self.preprocess_add_request(req)" in source
    assert "self._handle_request_preproc_error(req)" in source


def test_envs_cache_is_cleared_for_the_v1_runner():
    """Patch 4, in a fresh process: after vLLM caches its environment, the VTW hook still
    makes the config read the V1 runner."""
    import subprocess
    import sys

    code = """
import os
os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
import vllm.envs as envs
envs.enable_envs_cache()
assert envs.VLLM_USE_V2_MODEL_RUNNER is True
from vtw_vllm.vllm_patches import use_v1_model_runner
use_v1_model_runner()
assert envs.VLLM_USE_V2_MODEL_RUNNER is False
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def test_prefix_cache_internals_vtw_uses():
    """The scheduler and block-pool internals the VTW prefix cache relies on."""
    from vllm.v1.core.block_pool import BlockHashToBlockMap, BlockPool
    from vllm.v1.core.sched.scheduler import Scheduler

    assert _params(Scheduler._get_local_prefix_cache_hit) == ["self", "request"]
    assert _params(Scheduler._free_request_blocks) == ["self", "request"]
    assert "_free_request_blocks(request)" in inspect.getsource(Scheduler._preempt_request)
    assert _params(BlockPool._insert_block_hash) == [
        "self",
        "block_hash_with_group_id",
        "block",
        "num_tokens",
    ]
    assert callable(BlockHashToBlockMap.get_one_block)
    assert _params(FullAttentionManager.add_local_computed_blocks) == [
        "self",
        "request_id",
        "new_computed_blocks",
        "num_local_computed_tokens",
        "num_external_computed_tokens",
    ]
    # vLLM's partial-hit copy-on-write, which serves a hit ending mid-block.
    assert "_partial_hit_reqs" in inspect.getsource(FullAttentionManager.add_local_computed_blocks)
    # Attention metadata is reused across KV groups only for equal specs: VTW specs of
    # different layer spans must differ so no compacted group reuses another's metadata.
    from vtw_vllm.kv_cache import VTWAttentionSpec

    args = dict(block_size=16, num_kv_heads=2, head_size=32, dtype=torch.float32)
    assert VTWAttentionSpec(**args, first_layer=0) != VTWAttentionSpec(**args, first_layer=4)
    assert "cache_key = (kv_cache_spec, type(builder))" in inspect.getsource(
        GPUModelRunner._build_attention_metadata
    )


def test_runner_dispatch_hook():
    assert "force_eager" in _params(GPUModelRunner._determine_batch_execution_and_padding)


def test_resumed_mm_inputs_reaches():
    """What :mod:`vtw_vllm.resumed_mm_inputs` relies on: the scheduler output carries an
    extra attribute to the workers (they receive it pickled), the runner's
    ``_update_states`` hook, and the stripping it repairs (gone: drop the module)."""
    import pickle

    from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput

    from vtw_vllm.resumed_mm_inputs import ATTRIBUTE

    output = SchedulerOutput.make_empty()
    setattr(output, ATTRIBUTE, {"r": []})
    assert getattr(pickle.loads(pickle.dumps(output)), ATTRIBUTE) == {"r": []}
    assert _params(GPUModelRunner._update_states) == ["self", "scheduler_output"]
    assert "strip_covered_mm_data" in inspect.getsource(NewRequestData.from_request)
    assert "if mm_feature.data is None" in inspect.getsource(
        GPUModelRunner._batch_mm_inputs_from_scheduler
    )
