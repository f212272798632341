"""Benchmark the VTW row gather against torch baselines and against plain copy bandwidth.

The gather moves what a copy of the kept rows moves, so ``dst.copy_(src)`` of the same
bytes is the ceiling; the report gives each method's effective GB/s (useful bytes read
plus written) and its share of that ceiling. On CUDA the Triton kernel is timed with
``triton.testing.do_bench``; on CPU only the PyTorch paths run (vLLM's CPU build has no
Triton), timed with ``time.perf_counter``.

    python benchmarks/kernels/bench_gather_rows.py                      # full sweep
    python benchmarks/kernels/bench_gather_rows.py --tokens 512 --hidden 256 --out /tmp/b

Appends one CSV row per (config, method) to ``<out>/gather_rows.csv`` and writes this
run's table and plot to ``<out>/gather_rows_<device>.{md,png}``.
"""

from __future__ import annotations

import argparse
import csv
import platform
import re
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from vtw_vllm.kernels.gather_rows import gather_rows, triton
from vtw_vllm.kernels.gather_rows_naive import gather_rows_naive

REPO = Path(__file__).resolve().parents[2]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FIELDS = [
    "timestamp",
    "device",
    "torch",
    "triton",
    "commit",
    "dtype",
    "tokens",
    "hidden",
    "kept",
    "method",
    "ms_p50",
    "ms_p20",
    "ms_p80",
    "gbps",
    "pct_of_copy",
]


def device_label(device: torch.device) -> str:
    """GPU name, or the CPU model and thread count, for the results' provenance."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    names = re.findall(r"model name\s*:\s*(.+)", cpuinfo.read_text()) if cpuinfo.exists() else []
    model = names[0].strip() if names else platform.processor() or platform.machine()
    return f"CPU {model} ({torch.get_num_threads()} threads)"


def git_commit() -> str:
    """Short HEAD, marked dirty when the tree has changes; 'none' outside a commit."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=False
        ).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "none"
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def time_ms(fn: Callable[[], object], device: torch.device, reps: int) -> list[float]:
    """[p50, p20, p80] milliseconds per call."""
    if device.type == "cuda":
        return list(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))
    fn()  # warm-up: allocator and thread pool
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return torch.tensor(samples).quantile(torch.tensor([0.5, 0.2, 0.8])).tolist()


def bench_config(
    tokens: int, hidden: int, kept: float, dtype: torch.dtype, device: torch.device, reps: int
) -> list[dict]:
    """Time every method on one (tokens, hidden) batch; rows ready for the CSV."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=gen).to(device=device, dtype=dtype)
    r = torch.randn(tokens, hidden, generator=gen).to(device=device, dtype=dtype)
    p = torch.arange(tokens, device=device)
    num_kept = max(1, round(tokens * kept))
    index = torch.randperm(tokens, generator=gen)[:num_kept].sort().values.to(device)
    mask = torch.zeros(tokens, dtype=torch.bool, device=device)
    mask[index] = True
    src = torch.empty(2 * num_kept * hidden, dtype=dtype, device=device)
    dst = torch.empty_like(src)

    # "copy" first: the others' pct_of_copy divides by its GB/s.
    methods: dict[str, Callable[[], object]] = {
        "copy": lambda: dst.copy_(src),
        "index_select": lambda: gather_rows_naive(h, r, p, index),
        "bool_mask": lambda: (h[mask], r[mask], p[mask]),
    }
    if device.type == "cuda":
        methods["triton"] = lambda: gather_rows(h, r, p, index)
    # Useful bytes read + written: rows of h and r, positions, and the index read.
    moved = 2 * num_kept * (2 * hidden * h.element_size() + p.element_size())
    moved += num_kept * index.element_size()
    copy_bytes = 2 * src.numel() * src.element_size()

    rows, copy_gbps = [], 0.0
    for name, fn in methods.items():
        p50, p20, p80 = time_ms(fn, device, reps)
        gbps = (copy_bytes if name == "copy" else moved) / p50 / 1e6
        copy_gbps = gbps if name == "copy" else copy_gbps
        rows.append(
            {
                "tokens": tokens,
                "hidden": hidden,
                "kept": num_kept,
                "method": name,
                "ms_p50": f"{p50:.4f}",
                "ms_p20": f"{p20:.4f}",
                "ms_p80": f"{p80:.4f}",
                "gbps": f"{gbps:.1f}",
                "pct_of_copy": f"{100 * gbps / copy_gbps:.0f}",
            }
        )
    return rows


def write_results(rows: list[dict], out: Path, label: str) -> tuple[Path, Path]:
    """Append to the CSV history; overwrite this device's markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "gather_rows.csv"
    new = not csv_path.exists()
    with csv_path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    cols = ["dtype", "tokens", "hidden", "kept", "method", "ms_p50", "gbps", "pct_of_copy"]
    first = rows[0]
    lines = [
        f"# gather_rows on {label}",
        "",
        f"{first['timestamp']}, torch {first['torch']}, triton {first['triton']}, "
        f"commit {first['commit']}. GB/s = useful bytes read + written / median time.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
        *("| " + " | ".join(str(row[c]) for c in cols) + " |" for row in rows),
    ]
    slug = re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_").lower()
    md_path = out / f"gather_rows_{slug}.md"
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def plot_results(rows: list[dict], path: Path, label: str) -> Path:
    """GB/s per method vs batch tokens, one panel per hidden size, copy as the ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hiddens = sorted({int(r["hidden"]) for r in rows})
    fig, axes = plt.subplots(1, len(hiddens), figsize=(5 * len(hiddens), 3.5), squeeze=False)
    for ax, hidden in zip(axes[0], hiddens, strict=True):
        mine = [r for r in rows if int(r["hidden"]) == hidden]
        for method in dict.fromkeys(r["method"] for r in mine):
            pts = [(int(r["tokens"]), float(r["gbps"])) for r in mine if r["method"] == method]
            style = "--" if method == "copy" else "-"
            ax.plot(*zip(*pts, strict=True), style, marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens in the batch")
        ax.set_ylabel("GB/s (useful bytes)")
        ax.set_title(f"hidden {hidden}")
        ax.legend(fontsize=8)
    fig.suptitle(f"gather_rows, {label}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--hidden", type=int, nargs="+", default=[4096, 5120])
    parser.add_argument("--kept", type=float, default=0.1, help="fraction of rows kept")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per method on CPU")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    label = device_label(device)
    meta = {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": label,
        "torch": torch.__version__,
        "triton": triton.__version__ if triton is not None else "none",
        "commit": git_commit(),
        "dtype": args.dtype,
    }
    if device.type == "cuda" and triton is None:
        raise SystemExit("CUDA run needs triton for do_bench and the kernel")
    rows = []
    for hidden in args.hidden:
        for tokens in args.tokens:
            for row in bench_config(
                tokens, hidden, args.kept, DTYPES[args.dtype], device, args.reps
            ):
                rows.append({**meta, **row})
                print(" ".join(f"{k}={row[k]}" for k in FIELDS if k in row), flush=True)
    csv_path, md_path = write_results(rows, args.out, label)
    png_path = plot_results(rows, md_path.with_suffix(".png"), label)
    for path in (csv_path, md_path, png_path):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
