"""Fixture tools.

    python -m vtw_vllm.testing build --kind llava|llava_next|llava_next_video|llava_onevision|all
        [--out DIR] [--seed N]
    python -m vtw_vllm.testing calib-data --out DIR [--samples 20]

``calib-data`` writes PNG test images and a ``prompts.jsonl`` in the format
``vtw-vllm calibrate --data`` reads, for trying the calibration without real data.
"""

import argparse
import json
from pathlib import Path

from .fixtures import KINDS, get_fixture, make_test_image

QUESTIONS = ("What is in the picture?", "Which colour dominates?", "Describe the image.")


def write_calibration_data(out: Path, samples: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(samples):
        make_test_image(500 + i).save(out / f"{i:03d}.png")
        question = QUESTIONS[i % len(QUESTIONS)]
        rows.append({"image": f"{i:03d}.png", "prompt": f"USER: <image>\n{question} ASSISTANT:"})
    path = out / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vtw_vllm.testing")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build (or reuse) fixture checkpoints")
    build.add_argument("--kind", choices=[*KINDS, "all"], default="all")
    build.add_argument("--out", help="cache directory (default: $VTW_FIXTURE_CACHE or ~/.cache)")
    build.add_argument("--seed", type=int, default=0)
    calib = commands.add_parser("calib-data", help="images + prompts.jsonl for calibrate")
    calib.add_argument("--out", type=Path, required=True)
    calib.add_argument("--samples", type=int, default=20)
    args = parser.parse_args(argv)
    if args.command == "calib-data":
        print(write_calibration_data(args.out, args.samples))
        return
    for kind in KINDS if args.kind == "all" else (args.kind,):
        print(get_fixture(kind, cache_dir=args.out, seed=args.seed))


if __name__ == "__main__":
    main()
