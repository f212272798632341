"""Shared helpers: real vLLM engines (in-process: an engine start costs seconds; a fresh
engine-core process or ``vllm serve`` ~15-30 s more), shared per module or session."""

import base64
import contextlib
import gc
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
import torch

# Engine defaults that suit the 2-core CPU machines and the tiny fixtures.
ENGINE_DEFAULTS = dict(
    dtype="float32",
    max_model_len=4096,
    max_num_seqs=8,
    kv_cache_memory_bytes=64 * 2**20,
    enforce_eager=True,
    max_logprobs=-1,
    seed=0,
)
# `make gpu-check` runs the engine tests once per CUDA attention backend and dtype.
if os.environ.get("VTW_TEST_ATTENTION_BACKEND"):
    ENGINE_DEFAULTS["attention_backend"] = os.environ["VTW_TEST_ATTENTION_BACKEND"]
if os.environ.get("VTW_TEST_DTYPE"):
    ENGINE_DEFAULTS["dtype"] = os.environ["VTW_TEST_DTYPE"]


# One line per engine start (in-process, multi-process or `vllm serve`), printed at the end
# of the run with its seconds, so a new start shows in every CI log.
ENGINE_STARTS: list[tuple[str, str, float]] = []


@contextlib.contextmanager
def environment(**values: str | None) -> Iterator[None]:
    """Set (or, for None, unset) environment variables for the block. vLLM caches its
    environment variables once an engine core has started in this process
    (``enable_envs_cache``): the cache is cleared on the way in and out, so the next engine
    reads them afresh."""
    import vllm.envs as envs

    def clear_vllm_cache() -> None:
        if envs._is_envs_cache_enabled():
            envs.__getattr__.cache_clear()

    old = {name: os.environ.get(name) for name in values}
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    clear_vllm_cache()
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        clear_vllm_cache()


@contextlib.contextmanager
def vllm_engine(model: str, multiprocess: bool = False, **overrides) -> Iterator["object"]:
    """Start a real vLLM ``LLM`` and shut it down afterwards.

    In-process by default: the engine core runs in this process (vLLM's
    ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the same ``EngineCore``, scheduler and runner),
    which starts in seconds instead of the ~15 s of a fresh engine-core process, and lets a
    test read the scheduler (``llm.llm_engine.engine_core.engine_core.scheduler``) between
    steps. ``multiprocess=True`` for what only the engine-core process does (e.g. turning a
    bad request into an error output instead of raising); ``vllm serve`` and the demo
    always run multi-process."""
    from vllm import LLM

    start = time.monotonic()
    with environment(VLLM_ENABLE_V1_MULTIPROCESSING="1" if multiprocess else "0"):
        llm = LLM(model=model, **{**ENGINE_DEFAULTS, **overrides})
    kind = "multi-process" if multiprocess else "in-process"
    ENGINE_STARTS.append((kind, os.path.basename(model), time.monotonic() - start))
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def needs_ranks(n: int) -> pytest.MarkDecorator:
    """For engines of ``n`` ranks (tensor / pipeline / data parallel): on CUDA they need
    ``n`` GPUs and skip with fewer (``make gpu-check`` on a one-GPU box); the CPU build
    runs every rank on this machine, so on CPU they always run."""
    short = torch.cuda.is_available() and torch.cuda.device_count() < n
    return pytest.mark.skipif(short, reason=f"needs {n} GPUs")


def run_cli(*argv: str, unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``vtw-vllm ARGV`` (:func:`vtw_vllm.cli.main`) in this process with its engine core
    in-process: the command's own code end to end, without the ~25 s of a fresh
    interpreter and engine-core process. Exit status, stdout and stderr as
    ``subprocess.run`` gives them (``python -m vtw_vllm.cli`` itself runs as a subprocess
    in the refusal tests). ``unset``: environment variables a user would not have."""
    from vtw_vllm.cli import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    start = time.monotonic()
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", **dict.fromkeys(unset)}
    with environment(**env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(argv))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    seconds = time.monotonic() - start
    ENGINE_STARTS.append(("in-process", f"vtw-vllm {argv[0]}: the whole job", seconds))
    gc.collect()
    return subprocess.CompletedProcess(["vtw-vllm", *argv], code, out.getvalue(), err.getvalue())


def pytest_terminal_summary(terminalreporter) -> None:
    total = sum(seconds for _, _, seconds in ENGINE_STARTS)
    terminalreporter.section(f"engine starts: {len(ENGINE_STARTS)}, {total:.0f} s to start")
    for kind, model, seconds in ENGINE_STARTS:
        terminalreporter.write_line(f"{seconds:6.1f} s  {kind:<13} {model}")


def first_logprobs(output) -> torch.Tensor:
    """The first generated token's log-probabilities as a dense vector (-inf elsewhere)."""
    first = output.outputs[0].logprobs[0]
    values = torch.full((max(first) + 1,), float("-inf"))
    for token_id, lp in first.items():
        values[token_id] = lp.logprob
    return values


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    atol: float,
    rtol: float = 0.0,
    what: str = "values",
) -> None:
    """torch.testing.assert_close, reporting the worst mismatches first."""
    diff = (actual - expected).abs()
    if diff.numel() and not torch.all(diff <= atol + rtol * expected.abs()):
        worst = torch.topk(diff.flatten(), k=min(5, diff.numel()))
        rows = [
            f"  index {i}: actual {actual.flatten()[i]:.6f} expected {expected.flatten()[i]:.6f}"
            for i in worst.indices.tolist()
        ]
        pytest.fail(f"{what} differ (max {diff.max():.3g} > atol {atol}):\n" + "\n".join(rows))


# -- the shared `vllm serve` process (tests/test_server.py, tests/test_soak.py) ---------

SERVER_KV_BYTES = 12 * 2**20  # 96 blocks of 128 tokens x 2 layers: a few image requests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(model_dir: str, args: list[str], log_path) -> Iterator[str]:
    """``vllm serve model_dir *args`` on a free loopback port until the block ends; yields
    its base URL once /health answers (fails the test with the log's tail otherwise)."""
    port = _free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model_dir,
        "--host", "127.0.0.1", "--port", str(port), *args,
    ]  # fmt: skip
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    try:
        deadline = started + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(2)
        seconds = time.monotonic() - started
        ENGINE_STARTS.append(("vllm serve", os.path.basename(model_dir), seconds))
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.fixture(scope="session")
def vtw_server(tmp_path_factory):
    """``vllm serve DIR --served-model-name llava-vtw --data-parallel-size 2`` on loopback,
    DIR written by ``vtw-vllm prepare`` from the tiny LLaVA (default K=4, allowed K 2, 4,
    6, 8): VTW with no ``--hf-overrides``; a small KV budget per engine. Data parallel, as
    users scale out: two engine cores (each its own scheduler and KV pool) behind two API
    servers sharing the port. Yields base URL, served model name, the source checkpoint
    (for the reference), log path and the data-parallel size."""
    from vtw_vllm.prepare import prepare
    from vtw_vllm.testing import get_fixture

    source = str(get_fixture("llava"))
    model_dir = prepare(source, tmp_path_factory.mktemp("prepared") / "llava-vtw", 4, [2, 4, 6])
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    args = [
        "--served-model-name", "llava-vtw", "--data-parallel-size", "2",
        "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager",
        "--max-logprobs", "-1", "--kv-cache-memory-bytes", str(SERVER_KV_BYTES),
        "--max-num-seqs", "16", "--limit-mm-per-prompt", json.dumps({"image": 2}),
    ]  # fmt: skip
    with (
        environment(VLLM_CPU_OMP_THREADS_BIND="0|1"),  # one core per engine core
        served(str(model_dir), args, log_path) as base,
    ):
        yield {
            "base": base,
            "model": "llava-vtw",
            "source": source,
            "log": log_path,
            "data_parallel_size": 2,
        }


def data_url(seed: int) -> str:
    """A fixture image as a PNG data URL (the tests have no network)."""
    from vtw_vllm.testing import make_test_image

    buf = io.BytesIO()
    make_test_image(seed).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def metric_per_engine(server: dict, name: str) -> dict[str, float]:
    """A Prometheus metric per engine core (its ``engine`` label), summed over the rest."""
    values: dict[str, float] = {}
    for line in httpx.get(f"{server['base']}/metrics", timeout=10).text.splitlines():
        if line.split("{")[0] == name and 'engine="' in line:
            engine = line.split('engine="')[1].split('"')[0]
            values[engine] = values.get(engine, 0.0) + float(line.split()[-1])
    return values


def metric(server: dict, name: str) -> float:
    """A Prometheus metric from the server, summed over its label sets."""
    text = httpx.get(f"{server['base']}/metrics", timeout=10).text
    values = [
        float(line.split()[-1])
        for line in text.splitlines()
        if line.split("{")[0].split(" ")[0] == name
    ]
    assert values, f"{name} not in /metrics"
    return sum(values)
