"""What the greedy working of a model gets wrong on `arithmetic_cot`'s held-out prompts.

    .venv/bin/python scripts/cot_errors.py TASK_DIR MODEL_DIR [MODEL_DIR ...]

TASK_DIR is an `arithmetic_cot` task directory (`posttrain tasks make arithmetic_cot --out
DIR`); each MODEL_DIR a model trained on it (its `sft/final`, an RL run's `final`). Prints, for
each model, how many of the held-out prompts (`rl_eval.jsonl`) it answers in each class, with up
to three examples of each mistake:

    right_carry, right_nocarry   the exact working (a sum with / without a carry)
    forgot_carries               the demonstrator's slip: every carry left out
    format                       not `x+y=s;...#answer`
    n_columns                    too few or too many columns
    digits_copied_wrong          a column with an operand digit misread
    carry_flag                   a `+1` written where there is no carry, or left out alone
    column_sum                   a column sum that is not its digits' (plus the carry)
    final_answer                 right working, wrong answer after `#`
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch

from posttrain.models.load import load_causal_lm, load_tokenizer
from posttrain.tasks.arithmetic import (
    cot_completion,
    cot_completion_forgetting_carries,
    cot_has_carry,
    cot_steps,
    parse_cot,
)


def classify(prompt: str, response: str) -> str:
    a, b = map(int, prompt.removesuffix("=").split("+"))
    if response == cot_completion(a, b):
        return "right_carry" if cot_has_carry(a, b) else "right_nocarry"
    if response == cot_completion_forgetting_carries(a, b):
        return "forgot_carries"
    parsed = parse_cot(response)
    if parsed is None:
        return "format"
    steps, _ = parsed
    true = cot_steps(a, b)
    if len(steps) != len(true):
        return "n_columns"
    for (x, y, c, s), (tx, ty, tc, _) in zip(steps, true, strict=True):
        if (x, y) != (tx, ty):
            return "digits_copied_wrong"
        if c != tc:
            return "carry_flag"
        if s != x + y + c:
            return "column_sum"
    return "final_answer"


@torch.no_grad()
def greedy(model_dir: str, prompts: list[str], max_new_tokens: int) -> list[str]:
    tok, model = load_tokenizer(model_dir), load_causal_lm(model_dir).eval()
    out = []
    for i in range(0, len(prompts), 50):
        enc = tok(prompts[i : i + 50], return_tensors="pt", padding=True, padding_side="left")
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        out += [tok.decode(row[enc["input_ids"].shape[1] :], skip_special_tokens=True)
                for row in ids]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task_dir")
    parser.add_argument("models", nargs="+")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args()
    records = [json.loads(line) for line in (Path(args.task_dir) / "rl_eval.jsonl").open()]
    prompts = [r["prompt"] for r in records]
    for model_dir in args.models:
        counts: collections.Counter[str] = collections.Counter()
        examples: dict[str, list[str]] = collections.defaultdict(list)
        for prompt, response in zip(prompts, greedy(model_dir, prompts, args.max_new_tokens),
                                    strict=True):
            kind = classify(prompt, response)
            counts[kind] += 1
            if not kind.startswith("right") and len(examples[kind]) < 3:
                examples[kind].append(prompt + response)
        print(f"{model_dir}: {dict(counts.most_common())} of {len(prompts)}")
        for kind, shown in examples.items():
            print(f"  {kind}: {', '.join(shown)}")


if __name__ == "__main__":
    main()
