"""What VTW refuses, with a clear error before any engine starts (the config hook runs
inside ``EngineArgs.create_engine_config``), and what it changes (logged)."""

import pytest

from vtw_vllm.testing import get_fixture

VTW = {"architectures": ["LlavaVTWForConditionalGeneration"], "vtw_k": 4}


def _config(**kwargs):
    from vllm.engine.arg_utils import EngineArgs

    args = dict(model=str(get_fixture("llava")), hf_overrides=VTW, max_model_len=2048)
    return EngineArgs(**{**args, **kwargs}).create_engine_config()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(attention_backend="FLASHINFER"), "FlashInfer-style backends"),
        (
            dict(pipeline_parallel_size=2, enforce_eager=True),
            "pipeline parallelism needs torch.compile",
        ),
        (dict(kv_events_config={"enable_kv_cache_events": True}), "KV cache events"),
        (
            dict(kv_transfer_config={"kv_connector": "ExampleConnector", "kv_role": "kv_both"}),
            "KV connectors",
        ),
        (
            dict(
                model=str(get_fixture("qwen2_5_vl")),
                hf_overrides={"architectures": ["Qwen2_5_VLVTWForConditionalGeneration"]},
                video_pruning_rate=0.5,
            ),
            "VTW does not compose with EVS video pruning",
        ),
    ],
)
def test_refused_with_a_clear_error(kwargs, match):
    with pytest.raises(Exception, match=match):
        _config(**kwargs)


def test_defaults_kept():
    config = _config()
    assert config.cache_config.enable_prefix_caching is True
    assert config.model_config.enforce_eager is False
    assert config.model_config.multimodal_config.mm_processor_cache_gb > 0
    assert config.scheduler_config.scheduler_cls == "vtw_vllm.scheduler.make_vtw_scheduler"
    assert config.use_v2_model_runner is False


@pytest.mark.parametrize(
    "parallel, match",
    [
        (dict(enable_dbo=True), "microbatching"),
        (dict(ubatch_size=2), "microbatching"),
        (dict(decode_context_parallel_size=2), "context parallelism"),
        (dict(prefill_context_parallel_size=2), "context parallelism"),
    ],
)
def test_parallel_modes_refused(parallel, match):
    """Microbatching and context parallelism need several devices to configure for real;
    the refusal itself is plain Python on the config."""
    from types import SimpleNamespace

    from vtw_vllm.engine_config import _refuse_unsupported

    base = dict(
        enable_dbo=False, ubatch_size=1, decode_context_parallel_size=1,
        prefill_context_parallel_size=1, pipeline_parallel_size=1,
    )  # fmt: skip
    config = SimpleNamespace(
        lora_config=None,
        parallel_config=SimpleNamespace(**base),
        model_config=SimpleNamespace(multimodal_config=None, enforce_eager=False),
    )
    _refuse_unsupported(config)  # the defaults pass
    config.parallel_config = SimpleNamespace(**{**base, **parallel})
    with pytest.raises(ValueError, match=match):
        _refuse_unsupported(config)


@pytest.mark.parametrize("method", ["eagle3", "mtp", "draft_model", "medusa", "suffix"])
def test_speculation_other_than_ngram_refused(method):
    """Draft-model methods need their draft checkpoints to configure for real; the
    refusal itself is plain Python on the method name (n-gram passes)."""
    from types import SimpleNamespace

    from vtw_vllm.engine_config import _refuse_speculation_but_ngram

    _refuse_speculation_but_ngram(None)
    _refuse_speculation_but_ngram(SimpleNamespace(method="ngram"))
    with pytest.raises(ValueError, match=f"VTW supports n-gram speculative decoding.*'{method}'"):
        _refuse_speculation_but_ngram(SimpleNamespace(method=method))
