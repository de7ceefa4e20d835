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


TRAINERS = {
    "sft": ("posttrain.trainers.sft", "SFTConfig", "SFTTrainer",
            "supervised fine-tuning (completion-only loss)"),
    "rm": ("posttrain.trainers.reward", "RMConfig", "RewardModelTrainer",
           "train a Bradley-Terry reward model on preference pairs"),
    "dpo": ("posttrain.trainers.dpo", "DPOConfig", "DPOTrainer",
            "direct preference optimisation (DPO, cDPO, IPO, DPO-P, DPO+SFT, ...)"),
    "rl": ("posttrain.trainers.rl", "RLConfig", "RLTrainer",
           "RL with a preset: ppo, ppo_ptx, grpo, dr_grpo, dapo, rloo, reinforce_pp, "
           "reinforce_pp_baseline, vc_ppo, vapo"),
}


def _config_epilog(command: str) -> str:
    """Every config key with its default and meaning, for `posttrain COMMAND --help`."""
    import importlib

    from posttrain.config import config_help

    module, cfg_name, _, _ = TRAINERS[command]
    rows = config_help(getattr(importlib.import_module(module), cfg_name))
    width = max(len(k) for k, _, _ in rows) + 2
    lines = ["config keys (set in the YAML file or as --KEY VALUE):"]
    for key, default, text in rows:
        lines.append(f"  --{key:<{width}} {text} [default: {default}]")
    return "\n".join(lines)


def _train(args: argparse.Namespace, extra: list[str]) -> int:
    import importlib

    from posttrain import pipeline
    from posttrain.config import load_config, merge, parse_overrides
    from posttrain.errors import NonFiniteError, PosttrainError

    command = args.command
    module, cfg_name, trainer_name, _ = TRAINERS[command]
    try:
        mod = importlib.import_module(module)
        base: dict = {}
        preset: dict = {}
        if command == "rl" and args.preset:
            preset = pipeline.load_preset(args.preset)
        if args.task:
            task_dir = pipeline.ensure_task(args.task)
            base = {"sft": pipeline.sft_base, "rm": pipeline.rm_base,
                    "dpo": pipeline.dpo_base}.get(command, lambda d: {})(task_dir)
            if command == "rl":
                # the task adapts the preset (e.g. a critic from the policy under rule rewards)
                base = pipeline.rl_base(task_dir, preset)
        base = merge(preset, base) if command == "rl" else base
        overrides = parse_overrides(extra)
        if args.resume:
            overrides = merge(overrides, {"run": {"resume": True}})
        cfg = load_config(getattr(mod, cfg_name), args.config, overrides,
                          preset_dir=pipeline.preset_dir(), base=base)
        trainer = getattr(mod, trainer_name)(cfg)
        result = trainer.train()
    except NonFiniteError as err:
        print(f"posttrain {command}: stopped: {err}", file=sys.stderr)
        return 1
    except PosttrainError as err:
        print(f"posttrain {command}: error: {err}", file=sys.stderr)
        return 2
    if result.status == "interrupted":
        print(f"stopped at step {result.steps_done}; resume with the same command and --resume")
        return 130
    print(f"finished {result.steps_done} steps in {result.seconds:.0f}s; run directory "
          f"{result.run_dir}, final model {result.final_dir}")
    for k, v in sorted(result.eval_metrics.items()):
        print(f"  {k:<28} {v:.4f}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from posttrain.tracking.report import write_report

    run_dir = Path(args.run_dir)
    if not (run_dir / "metrics.jsonl").exists():
        print(f"posttrain report: error: {run_dir} has no metrics.jsonl; give a run directory "
              "(runs/NAME)", file=sys.stderr)
        return 2
    path = write_report(run_dir)
    from posttrain.tracking.metrics import read_jsonl, read_metrics
    from posttrain.tracking.monitors import check_all

    for alert in check_all(read_metrics(run_dir),
                           read_jsonl(run_dir / "advantage_by_position.jsonl")):
        print(f"WARNING (step {alert.step}): {alert.message}")
    print(f"wrote {path}")
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

    report = sub.add_parser(
        "report", help="(re)draw a run's report.html and plots from its logs",
        description="Write RUN_DIR/report.html (self-contained) and RUN_DIR/plots/*.png from "
        "the run's metrics, samples and alerts. Training runs write it when they end.")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (runs/NAME)")
    report.set_defaults(func=_report)

    for command, (_, _, _, text) in TRAINERS.items():
        p = sub.add_parser(
            command, help=text, description=text,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.__class__ = _TrainerParser
        p.command = command
        p.add_argument("--config", metavar="FILE", help="YAML config (may say `base: other.yaml`)")
        p.add_argument("--task", metavar="NAME",
                       help="run on a built-in task (data, tiny model and earlier stages are "
                       "made under runs/tasks/NAME on first use)")
        p.add_argument("--resume", action="store_true",
                       help="continue from the newest complete checkpoint of the run")
        if command == "rl":
            p.add_argument("--preset", metavar="NAME",
                           help="algorithm preset (see the list above)")
        p.set_defaults(func=_train, takes_overrides=True)
    return parser


def _quiet_libraries() -> None:
    """transformers' own progress bars and load reports would bury ours."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


class _TrainerParser(argparse.ArgumentParser):
    """Lists every config key in --help, importing the trainer only when help is shown."""

    command = ""

    def format_help(self) -> str:
        self.epilog = _config_epilog(self.command)
        return super().format_help()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    _quiet_libraries()
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "takes_overrides", False):
        return args.func(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
