#!/usr/bin/env bash
# The committed CPU sweep of benchmarks/results/o2i_sweep.json, as it was run on the 2-core machine: every run
# with one thread, two runs at a time (resumable: rerun the script and finished rows are skipped).
# Protocol --schedule time (the default): the curriculum and the cosine learning rate in fractions of the budget.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
# the headline: the selection method with the recipe that learns in the tiny regime, and the dense CNN,
# under the same 15-minute budget at O2I 0.30 % and 0.075 %
$PY benchmarks/o2i_sweep.py --methods ips dense --canvas 512 1024 --minutes 15 --jobs 2 --threads 1
# every method at the small canvases, shorter budgets; the other methods at 512 and 1024 px (two lanes in
# parallel on the committed machine, one run each)
$PY benchmarks/o2i_sweep.py --canvas 64 128 256 --minutes 3 --minutes-at 64=2,256=4 --jobs 2 --threads 1
$PY benchmarks/o2i_sweep.py --methods ats dps patch_mil --canvas 512 1024 --minutes 5 --jobs 2 --threads 1
