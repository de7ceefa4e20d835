"""The `posttrain` command."""

from __future__ import annotations

import argparse
import sys

from posttrain import __version__
from posttrain.api import TRAINERS


def _quickstart(args: argparse.Namespace) -> int:
    from posttrain.errors import PosttrainError
    from posttrain.quickstart import run_quickstart

    tasks = ("preference", "arithmetic") if args.task == "all" else (args.task,)
    presets = {t: args.preset for t in tasks} if args.preset else None
    try:
        run_quickstart(args.out, args.budget, tasks, presets, args.progress, args.engine)
    except PosttrainError as err:
        print(f"posttrain quickstart: error: {err}", file=sys.stderr)
        return 2
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


def _config_epilog(command: str, preset: str | None = None) -> str:
    """Every config key with its effective default and meaning, for `posttrain COMMAND
    --help`; with `--preset NAME` (rl), the values the preset sets are shown as defaults."""
    import importlib

    from posttrain.config import config_help

    module, cfg_name, _, _ = TRAINERS[command]
    rows = config_help(getattr(importlib.import_module(module), cfg_name))
    chosen = _flatten(_help_preset(preset)) if preset else {}
    width = max(len(k) for k, _, _ in rows) + 2
    head = f" (preset {preset})" if chosen else " (rl: add --preset NAME to see its values)" \
        if command == "rl" else ""
    lines = [f"config keys (set in the YAML file or as --KEY VALUE){head}:"]
    for key, default, text in rows:
        shown = f"{chosen[key]!r}, from the preset" if key in chosen else default
        lines.append(f"  --{key:<{width}} {text} [default: {shown}]")
    return "\n".join(lines)


def _help_preset(name: str) -> dict:
    from posttrain import pipeline
    from posttrain.errors import PosttrainError

    try:
        return pipeline.load_preset(name)
    except PosttrainError:
        return {}


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _train(args: argparse.Namespace, extra: list[str]) -> int:
    """`posttrain sft|rm|dpo|kto|rl`: `posttrain.api.build` with the command line's values."""
    from posttrain import api, distributed
    from posttrain.config import parse_overrides
    from posttrain.errors import NonFiniteError, PosttrainError

    command = args.command
    dist = distributed.init()
    try:
        trainer = api.build(command, args.config, preset=getattr(args, "preset", None),
                            task=args.task, overrides=parse_overrides(extra),
                            resume=args.resume)
        result = trainer.train()
    except NonFiniteError as err:
        print(f"posttrain {command}: stopped: {err}", file=sys.stderr)
        return 1
    except PosttrainError as err:
        print(f"posttrain {command}: error: {err}", file=sys.stderr)
        return 2
    dist.barrier()  # leave together: a rank exiting while another still works can abort it
    if not dist.is_main:
        return 0 if result.status == "finished" else 130
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


def _reward_spec(text: str):
    """A reward given on the command line: `module:function`, `file.py:function`, a rule or
    reward-model mapping in YAML (`{name: exact_match, column: answer}`), or `rm:DIR`."""
    if text.startswith("rm:"):
        return {"name": "reward_model", "path": text[3:]}
    if text.lstrip().startswith("{"):
        import yaml

        return yaml.safe_load(text)
    return text


def _eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from posttrain import evaluation, pipeline
    from posttrain.data.loading import load_examples
    from posttrain.errors import PosttrainError
    from posttrain.models.load import freeze, load_causal_lm, load_tokenizer
    from posttrain.rewards.build import build_reward

    try:
        rewards: dict[str, object] = {}
        prompts_path, texts_path, base_dir = args.prompts, args.text, None
        max_new = args.max_new_tokens
        if args.task:
            task_dir = pipeline.ensure_task(args.task)
            info = pipeline.task_info(task_dir)
            base_dir = task_dir
            prompts_path = prompts_path or str(task_dir / info["files"]["rl_eval"]["path"])
            texts_path = texts_path or str(task_dir / info["files"]["sft_eval"]["path"])
            max_new = max_new or pipeline.TASK_DEFAULTS[info["name"]]["max_new_tokens"]
            rewards["gold" if info["name"] == "preference" else "task"] = build_reward(
                info["reward"], task_dir)
            rm = task_dir / "rm" / "final"
            if (rm / "config.json").exists():
                rewards["reward_model"] = build_reward({"name": "reward_model",
                                                        "path": str(rm)})
        for i, spec in enumerate(args.reward or []):
            parsed = _reward_spec(spec)
            name = parsed.get("name", f"reward{i}") if isinstance(parsed, dict) else spec
            rewards[name] = build_reward(parsed, base_dir)
        if not prompts_path:
            raise PosttrainError("give --prompts FILE (prompt records) or --task NAME")
        prompts = load_examples(prompts_path, "prompt")[: args.limit]
        texts = load_examples(texts_path)[: args.limit] if texts_path else []
        tokenizer = load_tokenizer(args.model)
        model = freeze(load_causal_lm(args.model))
        baseline = freeze(load_causal_lm(args.baseline)) if args.baseline else None
        settings = evaluation.EvalSettings(args.samples, max_new or 32, args.temperature,
                                           args.seed)
        result = evaluation.evaluate(model, tokenizer, prompts, rewards, settings, baseline,
                                     args.judge, texts)
    except PosttrainError as err:
        print(f"posttrain eval: error: {err}", file=sys.stderr)
        return 2
    width = max(len(k) for k in result)
    print(f"{args.model}: {len(prompts)} prompts x {args.samples} samples")
    for key, value in result.items():
        print(f"  {key:<{width}}  {value:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


def _tasks_help(parser: argparse.ArgumentParser):
    def show(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    return show


def _rollout_server(args: argparse.Namespace) -> int:
    from posttrain.errors import ConfigError
    from posttrain.rollout.server import serve

    try:
        serve(args.model, args.host, args.port, args.dtype, args.max_model_len,
              args.gpu_memory_utilization, args.tensor_parallel_size, args.cpu_kv_cache_gib,
              args.seed)
    except ConfigError as err:
        print(f"posttrain rollout-server: {err}", file=sys.stderr)
        return 2
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
        help="the InstructGPT pipeline on the built-in tasks: SFT -> reward model -> PPO, "
        "and SFT -> GRPO; a before/after table and report.html",
        description="Build a tiny model and the built-in tasks, then run SFT -> reward model "
        "-> PPO (with a KL penalty) on `preference` and SFT -> GRPO on `arithmetic`, print "
        "gold and proxy reward, KL and held-out accuracy before and after, and write "
        "report.html. About 2 minutes on 2 CPU cores with the default budget.")
    qs.add_argument("--out", default="runs/quickstart", metavar="DIR",
                    help="where every stage is written (default runs/quickstart)")
    qs.add_argument("--budget", choices=["small", "default", "large"], default="default",
                    help="RL steps: small 0.4x, large 3x (default: default)")
    qs.add_argument("--task", choices=["all", "preference", "arithmetic"], default="all",
                    help="which pipeline(s) to run (default all)")
    qs.add_argument("--preset", metavar="NAME", help="RL preset for the chosen task(s) "
                    "(default: ppo on preference, grpo on arithmetic)")
    qs.add_argument("--progress", choices=["auto", "rich", "plain", "none"], default="auto",
                    help="progress display (default: a bar on a terminal)")
    qs.add_argument("--engine", choices=["lean", "hf", "vllm"], default="lean",
                    help="rollout engine of the RL stages (default lean; vllm needs "
                    "pip install 'posttrain[vllm]', see docs/rollout.md)")
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

    ev = sub.add_parser(
        "eval", help="measure a policy: rewards, win rate, perplexity, diversity, length",
        description="Sample responses to held-out prompts (fixed seed) and report the mean "
        "reward under each reward, the win rate against --baseline judged by --judge, "
        "perplexity on --text (and the alignment tax against the baseline), distinct-1/2 "
        "and mean response length, as a table and optionally JSON.")
    ev.add_argument("--model", required=True, metavar="DIR", help="the policy to evaluate")
    ev.add_argument("--task", metavar="NAME", help="use a built-in task's held-out prompts, "
                    "text and rewards (and its reward model, if trained)")
    ev.add_argument("--prompts", metavar="FILE", help="prompt records (with reward columns)")
    ev.add_argument("--reward", action="append", metavar="SPEC",
                    help="module:function, file.py:function, rm:DIR, or a YAML mapping such "
                    "as '{name: exact_match, column: answer}' (repeatable)")
    ev.add_argument("--baseline", metavar="DIR", help="a policy to compare against")
    ev.add_argument("--judge", metavar="NAME", help="the reward that decides the win rate "
                    "(default: the first)")
    ev.add_argument("--text", metavar="FILE", help="held-out text or completion records for "
                    "perplexity")
    ev.add_argument("--samples", type=int, default=4, help="responses per prompt (default 4)")
    ev.add_argument("--max-new-tokens", type=int, default=None, help="response length limit")
    ev.add_argument("--temperature", type=float, default=1.0, help="0 for greedy (default 1)")
    ev.add_argument("--limit", type=int, default=None, help="use at most N prompts and texts")
    ev.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    ev.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ev.set_defaults(func=_eval)

    report = sub.add_parser(
        "report", help="(re)draw a run's report.html and plots from its logs",
        description="Write RUN_DIR/report.html (self-contained) and RUN_DIR/plots/*.png from "
        "the run's metrics, samples and alerts. Training runs write it when they end.")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (runs/NAME)")
    report.set_defaults(func=_report)

    srv = sub.add_parser(
        "rollout-server", help="serve rollouts with vLLM in a process of its own, for RL runs "
        "with rollout.server set",
        description="Start vLLM on this process's devices and serve rollouts over HTTP: an RL "
        "run with `rollout.engine=vllm rollout.server=http://HOST:PORT` sends it prompts and "
        "its weights after each optimiser step. MODEL's config is what the engine builds; "
        "the weights come from the trainer. Needs vLLM (pip install 'posttrain[vllm]').")
    srv.add_argument("--model", required=True, metavar="DIR",
                     help="the policy's Hugging Face model directory (its config.json)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                     "127.0.0.1; 0.0.0.0 for other machines)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free)")
    srv.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16",
                                                         "float16"],
                     help="engine weight dtype (default: the model's)")
    srv.add_argument("--max-model-len", type=int, default=512,
                     help="longest prompt + response served (default 512)")
    srv.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                     help="share of the GPU's memory for weights and KV cache (default 0.9)")
    srv.add_argument("--tensor-parallel-size", type=int, default=1,
                     help="GPUs the engine spans (default 1)")
    srv.add_argument("--cpu-kv-cache-gib", type=int, default=1,
                     help="KV cache size on a CPU, whole GiB (default 1)")
    srv.add_argument("--seed", type=int, default=0, help="the engine's seed (default 0)")
    srv.set_defaults(func=_rollout_server)

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
            from posttrain.pipeline import list_presets

            p.add_argument("--preset", metavar="NAME",
                           help="algorithm preset: " + ", ".join(list_presets()))
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
        self.epilog = _config_epilog(self.command, _preset_in(sys.argv[1:]))
        return super().format_help()


def _preset_in(argv: list[str]) -> str | None:
    """The `--preset NAME` of a command line (help is printed before parsing ends)."""
    for i, arg in enumerate(argv):
        if arg == "--preset" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--preset="):
            return arg.split("=", 1)[1]
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    _quiet_libraries()
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "takes_overrides", False):
        from posttrain import distributed

        try:
            return args.func(args, extra)
        finally:
            distributed.shutdown()
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
