"""VTW through lmms-eval's vLLM backend, on a local task, offline.

    python benchmarks/lmms_eval/run.py --python /path/to/lmms-env/bin/python [--n 100]
                                       [--ks 7 8] [--out DIR]

lmms-eval is not a dependency of this project (its dependency set is large and its
stock tasks download their data from the Hugging Face hub); ``--python`` names an
interpreter that has both lmms-eval and this project's vLLM importable. The script:

1. writes the shipped shapes-VQA model's first ``--n`` held-out questions (PNG + JSONL,
   the same questions ``benchmarks/quality/run.py`` scores) and an lmms-eval task for them
   (``shapes_vqa``: ``datasets``' local JSON loader, exact match after the task's own
   normalisation);
2. writes one VTW model directory per K with ``vtw-vllm prepare`` (K = N is stock
   vLLM's computation), so lmms-eval's ``--model_args`` need no JSON;
3. runs ``python -m lmms_eval --model vllm`` per K, then ``vtw-vllm evaluate``'s code on
   the same questions in one engine (per-request K) as the cross-check, and records both
   accuracies, with the commands, in ``OUT/lmms_eval.md`` (default
   ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "checkpoints" / "vqa-tiny"

TASK_YAML = """\
task: shapes_vqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 16
  temperature: 0
  top_p: 1.0
  num_beams: 1
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""

TASK_UTILS = '''\
"""shapes_vqa for lmms-eval: the shipped shapes-VQA model's held-out questions."""

from PIL import Image

from vtw_vllm.quality.evaluate import is_correct


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(is_correct(results[0], doc["answer"]))}
'''


def write_task(out: Path, n: int) -> Path:
    """The held-out questions (absolute image paths) and the task folder; returns it."""
    spec = importlib.util.spec_from_file_location(
        "quality_run", REPO / "benchmarks" / "quality" / "run.py"
    )
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    heldout = quality.write_heldout(out / "data", n)
    rows = [json.loads(line) for line in heldout.read_text().splitlines()]
    data = out / "data" / "shapes_vqa.jsonl"
    data.write_text(
        "".join(json.dumps(r | {"image": str(out / "data" / r["image"])}) + "\n" for r in rows)
    )
    task = out / "task"
    task.mkdir(parents=True, exist_ok=True)
    (task / "shapes_vqa.yaml").write_text(TASK_YAML.format(data=data))
    (task / "utils.py").write_text(TASK_UTILS)
    return task


def accuracy(log_dir: Path) -> float:
    """exact_match of shapes_vqa from lmms-eval's newest results file under ``log_dir``."""
    files = sorted(log_dir.rglob("*results*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise RuntimeError(f"lmms-eval wrote no results file under {log_dir}")
    results = json.loads(files[-1].read_text())["results"]["shapes_vqa"]
    return next(v for key, v in results.items() if key.startswith("exact_match,"))


def evaluate_directly(heldout: Path, n: int, ks: list[int]) -> dict[int, float]:
    """The same questions through ``vtw-vllm evaluate``'s code: one engine, per-request K."""
    from vtw_vllm import calibrate
    from vtw_vllm.quality import evaluate as ev

    items = ev.load_eval_file(heldout, limit=n)
    llm = calibrate.make_engine(MODEL, layer_group_size=1, dtype="float32")
    return {k: acc.overall for k, acc in ev.evaluate(llm, items, ks).items()}


def _machine() -> str:
    import datetime
    import os
    import platform

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"{platform.machine()}, {os.cpu_count()} CPUs, commit {commit}, {when}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python", required=True, help="interpreter with lmms-eval and vLLM")
    parser.add_argument("--n", type=int, default=100, help="held-out questions")
    parser.add_argument("--ks", type=int, nargs="+", default=[7, 8])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    work = (args.out / "lmms_eval_work").resolve()
    task = write_task(work, args.n)
    rows, commands = [], []
    for k in args.ks:
        model = work / f"vqa-tiny-vtw-k{k}"
        prepare = [sys.executable, "-m", "vtw_vllm.cli", "prepare", "--model", str(MODEL)]
        subprocess.run([*prepare, "--out", str(model), "--vtw-k", str(k), "--force"], check=True)
        model_args = (
            f"model={model},max_model_len=2048,dtype=float32,kv_cache_memory_bytes={256 * 2**20}"
        )
        log_dir = work / f"logs-k{k}"
        cmd = [args.python, "-m", "lmms_eval", "--model", "vllm", "--model_args", model_args]
        cmd += ["--tasks", "shapes_vqa", "--include_path", str(task)]
        cmd += ["--output_path", str(log_dir), "--batch_size", "16"]
        commands.append(shlex.join(cmd))
        print("[lmms-eval]", commands[-1], flush=True)
        subprocess.run(cmd, check=True, cwd=work)
        rows.append((k, accuracy(log_dir)))
    direct = evaluate_directly(work / "data" / "heldout.jsonl", args.n, args.ks)
    lines = [
        "# lmms-eval (vllm backend) on VTW model directories",
        "",
        f"`python {shlex.join(sys.argv)}` ({_machine()}): shipped checkpoints/vqa-tiny, "
        f"first {args.n} held-out shapes-VQA questions, greedy, exact match after "
        "`vtw-vllm evaluate`'s normalisation, fp32.",
        "",
        "| K | lmms-eval (vllm backend), % | `vtw-vllm evaluate`, same questions, % |",
        "|---|---|---|",
        *[f"| {k} | {100 * acc:.1f} | {100 * direct[k]:.1f} |" for k, acc in rows],
        "",
        "Commands run:",
        "",
        *[f"    {c}" for c in commands],
        "",
    ]
    (args.out / "lmms_eval.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
