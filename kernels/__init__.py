"""Triton kernels of vtw_vllm (installed as ``vtw_vllm.kernels``)."""
