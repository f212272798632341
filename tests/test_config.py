"""VTWConfig: allowed K, KV layer groups and the engine settings of the config hook (no
engine; the hook is run on a real VllmConfig-shaped namespace where it is plain Python)."""

import logging
from types import SimpleNamespace

import pytest
from vllm.config.compilation import CUDAGraphMode

from vtw_vllm.config import VTWConfig
from vtw_vllm.engine_config import _use_piecewise_cuda_graphs
from vtw_vllm.scheduler import VTWAsyncScheduler, VTWScheduler, make_vtw_scheduler


def test_allowed_k_names_the_groups():
    vtw = VTWConfig(num_layers=32, default_k=16, allowed_k_values=(16,))
    assert vtw.allowed_k == [16, 32]
    assert vtw.group_starts == [0, 16]  # two KV cache groups
    assert [vtw.group_start(i) for i in (0, 15, 16, 31)] == [0, 0, 16, 16]
    assert vtw.resolve_k(None) == 16 and vtw.resolve_k({"vtw_k": 32}) == 32
    with pytest.raises(ValueError, match=r"\[16, 32\].*start at \[0, 16\]"):
        vtw.resolve_k({"vtw_k": 8})


def test_allowed_k_several_values():
    vtw = VTWConfig(num_layers=12, allowed_k_values=(9, 3, 6))
    assert vtw.allowed_k == [3, 6, 9, 12] and vtw.group_starts == [0, 3, 6, 9]
    assert vtw.resolve_k(None) == 12  # no default K: no withdrawal


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(allowed_k_values=(0, 4)), "1..8"),
        (dict(allowed_k_values=(9,)), "1..8"),
        (dict(allowed_k_values=()), "1..8"),
        (dict(default_k=2, allowed_k_values=(4,)), "not in vtw_allowed_k"),
        (dict(default_k=9), "above the number"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VTWConfig(num_layers=8, **kwargs)


def test_group_size_rule_and_its_warning(caplog):
    vtw = VTWConfig(num_layers=12, default_k=6)  # groups of 4 shrink to gcd(4, 6) = 2
    assert vtw.group_size == 2 and len(vtw.group_starts) == 6
    with caplog.at_level(logging.WARNING, logger="vtw_vllm.config"):
        vtw.log_layout()
    assert "6 KV cache groups instead of 3" in caplog.text and "vtw_allowed_k" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vtw_vllm.config"):
        VTWConfig(num_layers=32, default_k=16).log_layout()  # 16 is a multiple of 4
    assert not caplog.records


def test_from_hf_config_reads_allowed_k():
    hf = SimpleNamespace(
        text_config=SimpleNamespace(num_hidden_layers=8), vtw_k=4, vtw_allowed_k=[4]
    )
    assert VTWConfig.from_hf_config(hf).group_starts == [0, 4]


@pytest.mark.parametrize(
    "mode, expected",
    [
        (None, CUDAGraphMode.PIECEWISE),  # vLLM would default to FULL_AND_PIECEWISE
        (CUDAGraphMode.FULL_AND_PIECEWISE, CUDAGraphMode.PIECEWISE),
        (CUDAGraphMode.FULL, CUDAGraphMode.PIECEWISE),
        (CUDAGraphMode.FULL_DECODE_ONLY, CUDAGraphMode.PIECEWISE),
        (CUDAGraphMode.PIECEWISE, CUDAGraphMode.PIECEWISE),
        (CUDAGraphMode.NONE, CUDAGraphMode.NONE),
    ],
)
def test_full_cuda_graphs_become_piecewise(mode, expected):
    compilation = SimpleNamespace(cudagraph_mode=mode)
    _use_piecewise_cuda_graphs(compilation)
    assert compilation.cudagraph_mode == expected


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_scheduler_factory_follows_async_scheduling(monkeypatch, async_scheduling):
    """vLLM decides async scheduling after the config hook; the factory named as the
    scheduler class builds the matching VTW twin (AsyncScheduler on CUDA's default)."""
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    built = {}
    for cls in (VTWScheduler, VTWAsyncScheduler):
        monkeypatch.setattr(cls, "__init__", lambda self, **kw: built.update(kw))
    config = SimpleNamespace(scheduler_config=SimpleNamespace(async_scheduling=async_scheduling))
    scheduler = make_vtw_scheduler(vllm_config=config, block_size=16)
    assert isinstance(scheduler, AsyncScheduler) is async_scheduling
    assert built == {"vllm_config": config, "block_size": 16}
    assert VTWAsyncScheduler._get_local_prefix_cache_hit is VTWScheduler._get_local_prefix_cache_hit


@pytest.mark.parametrize(
    "dtype, expected",
    [("bfloat16", "FLASH_ATTN"), ("float16", "FLASH_ATTN"), ("float32", "TRITON_ATTN")],
)
def test_cuda_attention_backend_choice(monkeypatch, dtype, expected):
    """On CUDA (platform faked: plain Python), an unset backend becomes one VTW supports."""
    import torch
    from vllm.platforms import current_platform

    from vtw_vllm.engine_config import _choose_attention_backend

    monkeypatch.setattr(current_platform, "is_cuda", lambda: True)
    attention = SimpleNamespace(backend=None)
    _choose_attention_backend(attention, getattr(torch, dtype))
    assert attention.backend.name == expected
