"""The ``vtw-vllm`` command: ``prepare`` (:mod:`vtw_vllm.prepare`), ``calibrate``
(:mod:`vtw_vllm.calibrate`) and ``evaluate`` (:mod:`vtw_vllm.quality.evaluate`).

Everything the user gives is checked before the engine starts (an engine start costs
tens of seconds); bad input exits with status 2 and one line saying what is wrong.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NoReturn

from vtw_vllm.prepare import check_out, describe, prepare


def _calibrate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="choose the withdrawal layer K by KL divergence (the VTW paper's method)",
        description="KL(standard || VTW) of the next-token distribution for every "
        "candidate K on a few samples; the first K with mean KL < eta is chosen.",
    )
    p.add_argument("--model", required=True, help="local llava-hf checkpoint directory")
    p.add_argument(
        "--data",
        required=True,
        help='JSONL of {"image" or "video": path or data URL, "prompt": text}, or a folder '
        "of images with prompts.jsonl or prompts.txt",
    )
    _num_frames_arg(p)
    p.add_argument("--eta", type=float, default=0.003, help="KL threshold (paper: 0.003)")
    p.add_argument("--samples", type=int, default=20, help="samples to use (paper: 20)")
    p.add_argument("--candidates", type=int, nargs="+", help="K values (default: all allowed)")
    p.add_argument(
        "--num-tokens",
        type=int,
        default=1,
        help="average KL over the first m answer tokens, teacher-forced (default 1)",
    )
    p.add_argument(
        "--layer-group-size",
        type=int,
        help="KV layer group size of the deployment (default: the model's, else 4); "
        "candidates are limited to its multiples",
    )
    p.add_argument("--plot", type=Path, help="write the KL vs K plot (PNG) here")
    p.add_argument("--table", type=Path, help="write the markdown table here")
    p.add_argument("--write-config", action="store_true", help="write vtw_k into the model")
    p.add_argument(
        "--out",
        type=Path,
        help="write a VTW model directory here (as `vtw-vllm prepare`) with the chosen K "
        "(K = N when none qualifies)",
    )
    p.add_argument("--force", action="store_true", help="replace a prepared --out directory")
    p.add_argument(
        "--engine-args",
        default="{}",
        help="extra vllm.LLM arguments as JSON, e.g. '{\"max_model_len\": 4096}'",
    )
    p.set_defaults(run=_calibrate)


def _calibrate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from vtw_vllm import calibrate as cal

    engine_args = _engine_args(args.engine_args, parser)
    if args.samples < 1 or args.num_tokens < 1 or args.num_frames < 1:
        _fail(parser, "--samples, --num-tokens and --num-frames must be >= 1")
    try:
        cal.vtw_architecture(args.model)
        if args.out is not None:  # before the engine: a run must not end on a bad --out
            check_out(args.out, args.model, args.force)
        samples = cal.load_samples(args.data, limit=args.samples, num_frames=args.num_frames)
    except cal.CalibrationError as exc:
        _fail(parser, str(exc))
    print(f"{len(samples)} samples from {args.data}", flush=True)
    try:
        result = cal.calibrate(
            args.model,
            samples,
            eta=args.eta,
            candidates=args.candidates,
            num_tokens=args.num_tokens,
            layer_group_size=args.layer_group_size,
            **engine_args,
        )
    except cal.CalibrationError as exc:
        _fail(parser, str(exc))
    table = result.to_markdown()
    print(table)
    print(cal.summary_line(result))
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(table + "\n")
    if args.plot:
        print(f"plot: {cal.plot_kl(result, args.plot)}")
    if args.out is not None:
        k = result.chosen_k or result.num_layers
        if result.chosen_k is None:
            print(f"--out: no K reached the threshold; writing K = N = {k} (no withdrawal)")
        try:
            prepare(args.model, args.out, k, force=args.force)
        except cal.CalibrationError as exc:
            _fail(parser, str(exc))
        print(describe(args.out))
    if args.write_config:
        if result.chosen_k is None:
            _fail(parser, "--write-config: no K reached the threshold; config left unchanged")
        path = cal.write_vtw_k(args.model, result.chosen_k, args.layer_group_size)
        print(f"wrote vtw_k={result.chosen_k} into {path}")


def _prepare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="write a model directory that vLLM serves with VTW, no --hf-overrides needed",
        description="DIR gets SRC's config.json with the VTW architecture, vtw_k and "
        "vtw_allowed_k; every other file of SRC is symlinked, not copied.",
    )
    p.add_argument("--model", required=True, help="SRC: local llava-hf checkpoint directory")
    p.add_argument("--out", required=True, type=Path, help="DIR: the directory to write")
    p.add_argument("--vtw-k", type=int, required=True, help="default withdrawal layer K")
    p.add_argument(
        "--allowed-k",
        type=int,
        nargs="+",
        help="K values requests may use, each a KV layer-group boundary; fewer is faster "
        "(default: --vtw-k alone; N, no withdrawal, is always allowed)",
    )
    p.add_argument("--force", action="store_true", help="replace a prepared DIR")
    p.set_defaults(run=_prepare)


def _prepare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from vtw_vllm.calibrate import CalibrationError

    try:
        prepare(args.model, args.out, args.vtw_k, args.allowed_k, args.force)
    except CalibrationError as exc:
        _fail(parser, str(exc))
    print(describe(args.out))


def _evaluate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="accuracy on a POPE/MME-style VQA file, stock (K = N) and with VTW at each K",
        description="Greedy answers from one VTW engine, one pass per K (per-request K).",
    )
    p.add_argument("--model", required=True, help="local llava-hf checkpoint directory")
    p.add_argument(
        "--data",
        required=True,
        help='JSONL of {"image" or "video", "question" (or "text"), "answer" (or "label"), "type"}',
    )
    _num_frames_arg(p)
    p.add_argument("--k", type=int, nargs="+", help="K values (default: the model's and N)")
    p.add_argument("--limit", type=int, help="evaluate only the first questions")
    p.add_argument("--first-word", action="store_true", help="compare first words only")
    p.add_argument("--layer-group-size", type=int, help="KV layer group size (default: 4)")
    p.add_argument("--table", type=Path, help="write the markdown table here")
    p.add_argument("--engine-args", default="{}", help="extra vllm.LLM arguments as JSON")
    p.set_defaults(run=_evaluate)


def _evaluate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from vtw_vllm import calibrate as cal
    from vtw_vllm.config import VTWConfig
    from vtw_vllm.quality import evaluate as ev

    engine_args = _engine_args(args.engine_args, parser)
    try:
        cal.vtw_architecture(args.model)
        items = ev.load_eval_file(args.data, limit=args.limit, num_frames=args.num_frames)
    except cal.CalibrationError as exc:
        _fail(parser, str(exc))
    print(f"{len(items)} questions from {args.data}", flush=True)
    with cal.job_engine(args.model, args.layer_group_size, **engine_args) as llm:
        vtw = VTWConfig.from_hf_config(llm.llm_engine.vllm_config.model_config.hf_config)
        ks = args.k or sorted({vtw.default_k or vtw.num_layers, vtw.num_layers})
        bad = [k for k in ks if k not in vtw.allowed_k]
        if bad:
            _fail(parser, f"--k {bad}: this engine allows {vtw.allowed_k}")
        table = ev.to_markdown(ev.evaluate(llm, items, ks, args.first_word, progress=True))
    print(table)
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(table + "\n")


def _num_frames_arg(p: argparse.ArgumentParser) -> None:
    from vtw_vllm.calibrate import VIDEO_NUM_FRAMES

    p.add_argument(
        "--num-frames",
        type=int,
        default=VIDEO_NUM_FRAMES,
        help="frames sampled uniformly from each video, as `vllm serve` does "
        f"(default {VIDEO_NUM_FRAMES}, vLLM's; fewer if the video has fewer)",
    )


def _fail(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """Exit 2 with one line (argparse's ``error`` adds the usage, which says nothing about
    bad data)."""
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _engine_args(text: str, parser: argparse.ArgumentParser) -> dict:
    try:
        engine_args = json.loads(text)
        if not isinstance(engine_args, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        _fail(parser, f"--engine-args: {exc}")
    return engine_args


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vtw-vllm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _prepare_parser(sub)
    _calibrate_parser(sub)
    _evaluate_parser(sub)
    args = parser.parse_args(argv)
    args.run(args, sub.choices[args.command])


if __name__ == "__main__":
    main(sys.argv[1:])
