"""The `posttrain` command."""

from __future__ import annotations

import argparse
import sys

from posttrain import __version__


def _quickstart(args: argparse.Namespace) -> int:
    from posttrain.demo import grpo_table_demo

    print(
        "posttrain quickstart (preview)\n"
        "The full InstructGPT pipeline (tiny transformer, SFT -> reward model -> PPO, report)\n"
        "is not built yet. This preview runs what exists today: the algorithms layer training\n"
        "a tabular policy on `a+b=` prompts with GRPO advantages and the clipped policy loss.\n"
    )
    result = grpo_table_demo(steps=args.steps, seed=args.seed)
    print(f"{'step':>5}  {'sampled reward':>14}  {'P(right answer)':>15}")
    for i, (r, a) in enumerate(zip(result.reward, result.accuracy, strict=True), start=1):
        if i == 1 or i % 5 == 0 or i == len(result.reward):
            print(f"{i:>5}  {r:>14.3f}  {a:>15.3f}")
    start, end = result.reward[0], result.accuracy[-1]
    print(f"\nreward at step 1: {start:.3f}; probability of the right answer after "
          f"{args.steps} steps: {end:.3f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="posttrain",
        description="Post-training for language models: SFT, reward models, the PPO family "
        "(PPO, GRPO, DAPO, RLOO, REINFORCE++, VC-PPO, VAPO) and the DPO family.",
    )
    parser.add_argument("--version", action="version", version=f"posttrain {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    qs = sub.add_parser(
        "quickstart",
        help="run the main demonstration end to end (today: a preview of the algorithms layer)",
    )
    qs.add_argument("--steps", type=int, default=30, help="GRPO steps (default: 30)")
    qs.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    qs.set_defaults(func=_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
