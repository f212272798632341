"""Visual Tokens Withdrawal (VTW) for the LLaVA and Qwen-VL models served by vLLM.

vLLM calls :func:`register` in every process through the ``vllm.general_plugins``
entry point, so nothing needs to be imported by hand. Keep this module cheap: it is
also imported at interpreter start-up by the CPU torchvision fix.
"""

_MODELS = "vtw_vllm.models.llava_vtw"
_VIDEO_MODELS = "vtw_vllm.models.llava_video_vtw"
_QWEN_MODELS = "vtw_vllm.models.qwen_vl_vtw"
ARCHITECTURES = {
    "LlavaVTWForConditionalGeneration": f"{_MODELS}:LlavaVTWForConditionalGeneration",
    "LlavaNextVTWForConditionalGeneration": f"{_MODELS}:LlavaNextVTWForConditionalGeneration",
    "LlavaOnevisionVTWForConditionalGeneration": (
        f"{_VIDEO_MODELS}:LlavaOnevisionVTWForConditionalGeneration"
    ),
    "LlavaNextVideoVTWForConditionalGeneration": (
        f"{_VIDEO_MODELS}:LlavaNextVideoVTWForConditionalGeneration"
    ),
    "Qwen2_5_VLVTWForConditionalGeneration": (
        f"{_QWEN_MODELS}:Qwen2_5_VLVTWForConditionalGeneration"
    ),
    "Qwen3VLVTWForConditionalGeneration": f"{_QWEN_MODELS}:Qwen3VLVTWForConditionalGeneration",
}


def register() -> None:
    """vLLM plugin hook: register the VTW architectures, KV spec and config hook."""
    from vllm import ModelRegistry

    from vtw_vllm.kv_cache import register_kv_cache_spec
    from vtw_vllm.vllm_patches import (
        add_model_config_hook,
        forget_rejected_request_images,
        validate_vtw_k_in_engine_core,
    )

    for arch, qualname in ARCHITECTURES.items():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, qualname)
        add_model_config_hook(arch, _config_hook())
    register_kv_cache_spec()
    forget_rejected_request_images()
    validate_vtw_k_in_engine_core()


def _config_hook() -> type:
    from vllm.model_executor.models.config import VerifyAndUpdateConfig

    # Imported lazily: this module must stay cheap to import.
    class _LazyHook(VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            from vtw_vllm.engine_config import VTWEngineConfigHook

            VTWEngineConfigHook.verify_and_update_config(vllm_config)

    return _LazyHook
