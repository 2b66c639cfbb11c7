#!/usr/bin/env bash
# The committed CPU sweep of benchmarks/results/o2i_sweep.json, in the order it was run (resumable: rerun
# the script and finished rows are skipped). 2 runs at a time, one thread each, on the 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
# Protocol --schedule time (the default): the curriculum and the cosine learning rate in fractions of the budget.
# the headline: the selection method with the recipe that learns in the tiny regime, and the dense CNN,
# under the same 15-minute budget at O2I 0.30 % and 0.075 %
$PY benchmarks/o2i_sweep.py --methods ips dense --canvas 512 1024 --minutes 15 --jobs 2
# every method at every canvas of the CPU preset, shorter budgets
$PY benchmarks/o2i_sweep.py --canvas 64 128 256 --minutes 3 --minutes-at 64=2,256=4 --jobs 2
$PY benchmarks/o2i_sweep.py --methods ats dps patch_mil --canvas 512 1024 --minutes 5 --jobs 2
