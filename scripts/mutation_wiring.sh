#!/usr/bin/env bash
# Mutation testing of the RL trainer's wiring (issue 21; docs/testing.md): the methods of
# posttrain/trainers/rl.py between a rollout and the optimiser step (shape, advantages,
# update, update_minibatch, step_counts, positive_mask, policy_loss, value_loss,
# mismatch_metrics, _micro_indices, _share_of), against the fast tests of the wiring:
# tests/trainers/test_rl_options.py, test_rl_learns_fast.py and test_episode_runs.py (its runs
# not marked slow).
#
#   scripts/mutation_wiring.sh            # every mutant of those methods not killed yet
#   scripts/mutation_wiring.sh --all      # every mutant of those methods, again
#   scripts/mutation_wiring.sh NAME ...   # re-test these mutants (names as the summary lists)
#
# mutmut reads its settings from the working directory's pyproject.toml, and the ones for
# algos/ (pyproject.toml) must stay as they are, so this runs in .mutation-wiring/, a
# directory holding links to posttrain/ and tests/ and its own pyproject.toml. Every mutant is
# a new pytest session: $POSTTRAIN_TEST_TASKS keeps the task and its SFT start (trained once,
# about a minute) in .mutation-wiring/tasks across them. About an hour on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv}
LOCK=${TORCH_LOCK:-/tmp/torch.lock}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1  # see scripts/mutation.sh
export POSTTRAIN_TEST_TASKS=$ROOT/.mutation-wiring/tasks

METHODS=(shape advantages update update_minibatch step_counts positive_mask policy_loss
         value_loss mismatch_metrics _micro_indices _share_of)
TESTS='"tests/trainers/test_rl_options.py", "tests/trainers/test_rl_learns_fast.py",
    "tests/trainers/test_episode_runs.py"'

mkdir -p .mutation-wiring
cd .mutation-wiring
ln -sfn ../posttrain posttrain
ln -sfn ../tests tests
cat > pyproject.toml <<TOML
# written by scripts/mutation_wiring.sh
[tool.pytest.ini_options]
addopts = "-ra --strict-markers"
markers = ["slow: long end-to-end runs"]

[tool.mutmut]
source_paths = ["posttrain"]
only_mutate = ["posttrain/trainers/rl.py"]
pytest_add_cli_args_test_selection = [$TESTS]
pytest_add_cli_args = ["-q", "-p", "no:cacheprovider", "-m", "not slow"]
TOML

META=mutants/posttrain/trainers/rl.py.meta
if [ "${1:-}" = --all ] || [ ! -f "$META" ]; then
    names=()
    for m in "${METHODS[@]}"; do names+=("posttrain.trainers.rl.xǁRLTrainerǁ${m}__mutmut_*"); done
elif [ $# -gt 0 ]; then
    names=("$@")
else  # after a first run: only the mutants not killed yet (never run, or survivors)
    mapfile -t names < <(METHODS="${METHODS[*]}" python3 - "$META" <<'PY'
import json, os, sys
codes = json.load(open(sys.argv[1]))["exit_code_by_key"]
prefixes = tuple(f"posttrain.trainers.rl.xǁRLTrainerǁ{m}__mutmut_"
                 for m in os.environ["METHODS"].split())
print("\n".join(k for k, c in sorted(codes.items())
                if k.startswith(prefixes) and c not in (1, 3, 36, -24, 24, 152, 255)))
PY
    )
    [ ${#names[@]} -gt 0 ] || { echo "every mutant of the wiring is killed"; names=(); }
fi
if [ ${#names[@]} -gt 0 ]; then
    flock "$LOCK" "$VENV/bin/mutmut" run --max-children 1 "${names[@]}"
fi

METHODS="${METHODS[*]}" flock "$LOCK" "$VENV/bin/python" - <<'PY'
"""Score per method of the wiring, from mutmut's meta file of rl.py."""
import json
import os
from collections import Counter
from datetime import date
from pathlib import Path

codes = json.loads(Path("mutants/posttrain/trainers/rl.py.meta").read_text())["exit_code_by_key"]
methods = os.environ["METHODS"].split()
KILLED, TIMEOUT = {1, 3}, {36, -24, 24, 152, 255}
rows, survivors, total = [], [], Counter()
for m in methods:
    c = Counter()
    prefix = f"posttrain.trainers.rl.xǁRLTrainerǁ{m}__mutmut_"
    for name, code in codes.items():
        if not name.startswith(prefix):
            continue
        if code is None:
            c["not checked"] += 1
        elif code in KILLED or code in TIMEOUT:
            c["killed"] += 1
            c["timeout"] += code in TIMEOUT
        else:  # survived (0), no test reached it (5, 33), or anything else
            c["survived"] += 1
            survivors.append(name)
    tested = c["killed"] + c["survived"]
    rows.append((m, c, tested))
    total.update(c)
lines = [f"{'method':<20}{'mutants':>8}{'killed':>8}{'timeout':>8}{'survived':>9}"
         f"{'unchecked':>10}{'score':>8}"]
for name, c, tested in rows + [("TOTAL", total, total["killed"] + total["survived"])]:
    score = 100.0 * c["killed"] / tested if tested else float("nan")
    lines.append(f"{name:<20}{tested + c['not checked']:>8}{c['killed']:>8}{c['timeout']:>8}"
                 f"{c['survived']:>9}{c['not checked']:>10}{score:>7.1f}%")
print("\n".join(lines))
md = [f"# mutation score, the RL wiring of posttrain/trainers/rl.py ({date.today()})", "",
      "```", *lines, "```", "", "## surviving mutants (`mutmut show NAME` in .mutation-wiring/)",
      "", *[f"- {s}" for s in sorted(survivors)], ""]
Path("mutation-summary.md").write_text("\n".join(md))
print(f"{len(survivors)} survivors; summary in .mutation-wiring/mutation-summary.md")
PY
