#!/usr/bin/env bash
# Mutation testing of posttrain/algos/ with mutmut 3 (issue 21; docs/testing.md).
#
#   scripts/mutation.sh                  # every file of posttrain/algos/
#   scripts/mutation.sh objective kl     # only these modules
#   scripts/mutation.sh wiring           # the RL trainer's wiring (scripts/mutation_wiring.sh)
#
# mutmut is configured in pyproject.toml [tool.mutmut]: the package is copied into mutants/,
# only posttrain/algos/* is mutated, and each mutant runs the tests of tests/algos/ that call
# the mutated function. Each module is one `mutmut run`, one child at a time, under
# $TORCH_LOCK (flock), so other torch processes on the machine get the cores between modules.
# Naming the modules' mutants makes mutmut re-test all of them on every run. The per-file
# scores are printed and written to mutants/mutation-summary.md and mutation-summary.json
# (a module not run this time keeps its last results there).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
LOCK=${TORCH_LOCK:-/tmp/torch.lock}
# One intra-op thread: mutmut forks a child per mutant from a process that has already run
# torch, and a forked child of a process with a live OpenMP pool can hang (every such mutant
# then shows as a timeout). With one child at a time nothing is lost.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

if [ "${1:-}" = wiring ]; then
    exec scripts/mutation_wiring.sh
fi

if [ $# -gt 0 ]; then
    modules=("$@")
else
    modules=()
    for f in posttrain/algos/*.py; do
        m=$(basename "$f" .py)
        # a module with no function body (the package's __init__) has no mutant to run
        grep -qE '^\s*def ' "$f" && modules+=("$m")
    done
fi

for m in "${modules[@]}"; do
    echo "=== mutmut: posttrain/algos/$m.py"
    flock "$LOCK" "$VENV/bin/mutmut" run --max-children 1 "posttrain.algos.$m.*"
done

flock "$LOCK" "$VENV/bin/python" - <<'PY'
"""Per-file score from mutmut's meta files: killed / (tested mutants)."""
import json
from collections import Counter
from datetime import date
from pathlib import Path

KILLED = {1, 3}  # a failing test, or an error inside pytest
TIMEOUT = {36, -24, 24, 152, 255}  # counted as killed, as mutmut does, but shown apart
SURVIVED = {0}
rows, survivors = [], []
total = Counter()
for meta in sorted(Path("mutants/posttrain/algos").glob("*.py.meta")):
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    c = Counter()
    for name, code in codes.items():
        if code is None:
            c["not checked"] += 1
        elif code in KILLED:
            c["killed"] += 1
        elif code in TIMEOUT:
            c["killed"] += 1
            c["timeout"] += 1
        elif code in SURVIVED:
            c["survived"] += 1
            survivors.append(name)
        elif code in (5, 33):
            c["no tests"] += 1
            survivors.append(name)
        else:
            c["other"] += 1
    tested = c["killed"] + c["survived"] + c["no tests"] + c["other"]
    score = 100.0 * c["killed"] / tested if tested else float("nan")
    rows.append((meta.name.removesuffix(".meta"), dict(c), tested, score))
    total.update(c)
t_tested = total["killed"] + total["survived"] + total["no tests"] + total["other"]
t_score = 100.0 * total["killed"] / t_tested if t_tested else float("nan")

head = (f"{'file':<18}{'mutants':>8}{'killed':>8}{'timeout':>8}{'survived':>9}{'no tests':>9}"
        f"{'unchecked':>10}{'score':>8}")
lines = [head]
for name, c, tested, score in rows + [("TOTAL", dict(total), t_tested, t_score)]:
    lines.append(f"{name:<18}{tested + c.get('not checked', 0):>8}{c.get('killed', 0):>8}"
                 f"{c.get('timeout', 0):>8}"
                 f"{c.get('survived', 0):>9}{c.get('no tests', 0):>9}"
                 f"{c.get('not checked', 0):>10}{score:>7.1f}%")
print("\n".join(lines))
md = [f"# mutation score, posttrain/algos/ ({date.today().isoformat()})", "", "```",
      *lines, "```", "", "## surviving mutants (`mutmut show NAME`)", "",
      *[f"- {s}" for s in sorted(survivors)], ""]
Path("mutants/mutation-summary.md").write_text("\n".join(md))
Path("mutants/mutation-summary.json").write_text(json.dumps(
    {"date": date.today().isoformat(),
     "files": {n: {**c, "score": s} for n, c, _, s in rows},
     "total": {**dict(total), "score": t_score}, "survivors": sorted(survivors)}, indent=1))
print(f"{len(survivors)} survivors; summary in mutants/mutation-summary.md")
PY
