"""VTW model classes (registered lazily by :func:`vtw_vllm.register`)."""
