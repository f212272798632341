"""One vLLM engine per child process, with its scheduler readable: for the demo and the
benchmarks (never imported when serving).

Why a child process: several engines start one after another in one run, and only a
fresh process gives each the whole machine and frees all it held. Why the engine core in
that process (no V1 multiprocessing): the scheduler's requests and KV block tables are
then plain Python objects, read between steps instead of estimated.

    result = run_child("vtw_vllm.demo:run_engine", model, k, 8, 16)        # a module
    result = run_child("benchmarks/kv_capacity.py:measure_child", ...)     # a script

The child calls the target with the JSON-decoded arguments and prints its JSON-able
return value on one line after :data:`MARKER`; everything else it prints is vLLM's log.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

MARKER = "VTW_CHILD_JSON "


def in_process_engine_core() -> None:
    """Keep vLLM's engine core in this process; call before the engine is created."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def scheduler(llm: Any) -> Any:
    """The scheduler of an ``LLM`` built after :func:`in_process_engine_core`."""
    return llm.llm_engine.engine_core.engine_core.scheduler


def held_blocks(sched: Any, req_id: str) -> list[int]:
    """KV blocks the request holds now, per KV cache group (0 where it holds none)."""
    managers = sched.kv_cache_manager.coordinator.single_type_managers
    return [len(m.req_to_blocks.get(req_id, ())) for m in managers]


def bytes_per_block(sched: Any) -> list[int]:
    """Memory of one block id per group: its page in every layer of that group."""
    groups = sched.kv_cache_config.kv_cache_groups
    return [g.kv_cache_spec.page_size_bytes * len(g.layer_names) for g in groups]


def child_command(target: str, *args: Any) -> list[str]:
    """The command line that runs ``target(*args)`` in a fresh interpreter (see
    :func:`run_child`; the benchmarks' interleaved runs start it themselves)."""
    payload = json.dumps({"target": target, "args": list(args)}, default=str)
    return [sys.executable, "-m", "vtw_vllm.child_engine", payload]


def run_child(target: str, *args: Any, cwd: str | Path | None = None) -> Any:
    """``target(*args)`` in a fresh interpreter; its return value. ``target`` is
    ``module:function`` or ``path/to/script.py:function``; ``args`` must be JSON-able
    (paths are sent as strings)."""
    cmd = child_command(target, *args)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER) :])
    raise RuntimeError(
        f"child {target} failed (exit {proc.returncode}):\n"
        f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )


def _resolve(target: str) -> Any:
    where, name = target.rsplit(":", 1)
    if not where.endswith(".py"):
        return getattr(importlib.import_module(where), name)
    spec = importlib.util.spec_from_file_location("__vtw_child__", where)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as a script would be: its classes can find it
    spec.loader.exec_module(module)
    return getattr(module, name)


def main() -> None:
    payload = json.loads(sys.argv[1])
    result = _resolve(payload["target"])(*payload["args"])
    print(MARKER + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
