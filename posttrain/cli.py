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


def _parse_option(text: str) -> tuple[str, object]:
    """`KEY=VALUE`; VALUE is read as JSON when it parses (numbers, true/false), else a string."""
    import json

    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def _tasks_list(args: argparse.Namespace) -> int:
    from posttrain.tasks import TASKS

    width = max(len(name) for name in TASKS)
    for task in TASKS.values():
        print(f"{task.name:<{width}}  {task.description}")
    return 0


def _tasks_make(args: argparse.Namespace) -> int:
    from posttrain.errors import ConfigError
    from posttrain.tasks import get_task

    try:
        task = get_task(args.name)
        out = task.make(args.out, seed=args.seed, model=not args.no_model,
                        **dict(args.option or []))
    except ConfigError as err:
        print(f"posttrain tasks make: error: {err}", file=sys.stderr)
        return 2
    import json

    info = json.loads((out / "task.json").read_text())
    print(f"wrote task {task.name!r} (seed {args.seed}) to {out}/")
    for f in info["files"].values():
        print(f"  {f['path']:<18} {f['records']:>6} records  kind {f['kind']}")
    if task.name == "preference":
        print(f"  {'gold.json':<18} the hidden gold scorer (reward: GoldReward.from_file)")
    if info["model"]:
        print(f"  {'model/':<18} the tiny model and tokenizer (from_pretrained)")
    print(f"  {'task.json':<18} what the task is; suggested RL reward: "
          f"{json.dumps(info['reward'])}")
    return 0


def _tasks_help(parser: argparse.ArgumentParser):
    def show(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    return show


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

    tasks = sub.add_parser(
        "tasks",
        help="list the built-in tasks or write one (data files, task.json, tiny model)",
        description="The built-in tasks: small data sets and a tiny model, made locally.",
    )
    tasks.set_defaults(func=_tasks_help(tasks))
    tasks_sub = tasks.add_subparsers(dest="tasks_command", metavar="ACTION")
    tasks_list = tasks_sub.add_parser("list", help="name and one-line description of each task")
    tasks_list.set_defaults(func=_tasks_list)
    make = tasks_sub.add_parser(
        "make",
        help="write a task's data files, task.json and tiny model into a directory",
        description="Write the task's JSONL files, task.json and (unless --no-model) the tiny "
        "model and tokenizer under DIR/model. `posttrain tasks list` names the tasks.",
    )
    make.add_argument("name", metavar="NAME", help="the task (see `posttrain tasks list`)")
    make.add_argument("--out", required=True, metavar="DIR", help="directory to write into")
    make.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    make.add_argument("--no-model", action="store_true",
                      help="write only the data files and task.json, not the tiny model")
    make.add_argument("--option", action="append", type=_parse_option, metavar="KEY=VALUE",
                      help="a task option, e.g. wrong_fraction=0.3 (repeatable)")
    make.set_defaults(func=_tasks_make)
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
