"""``python -m vtw_vllm.testing build --kind llava|llava_next|all --out DIR [--seed N]``."""

import argparse

from .fixtures import KINDS, get_fixture


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vtw_vllm.testing")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build (or reuse) fixture checkpoints")
    build.add_argument("--kind", choices=[*KINDS, "all"], default="all")
    build.add_argument("--out", help="cache directory (default: $VTW_FIXTURE_CACHE or ~/.cache)")
    build.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for kind in KINDS if args.kind == "all" else (args.kind,):
        print(get_fixture(kind, cache_dir=args.out, seed=args.seed))


if __name__ == "__main__":
    main()
