#!/usr/bin/env bash
# Issue 23's many-core table in one call of the `device` tool (16 cores there).
#
# The machine cannot fetch anything: it runs on the packages its image holds (anyio,
# cloudpickle, numpy, psutil, pyarrow and joblib with its loky are there; trio is not,
# so asyncio only). Each case runs with workers 1, 2, 4 ... all cores and its peers, in
# a time share of BUDGET seconds (default 540, inside the tool's 600 s limit), and writes
# $OUT/<case>.md and .json: eight files, the most the tool brings back. A case cut off
# by its share leaves the others' tables intact.
#
#     device run: bash benchmarks/device_scale.sh        (timeout_s 590)
#     here, to try it:  OUT=/tmp/scale BUDGET=120 bash benchmarks/device_scale.sh
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/ashard-scale}"
mkdir -p "$out"
python="${PYTHON:-python3}"
"$python" -c "import anyio, cloudpickle, numpy, psutil, pyarrow, joblib, os, platform
print('cores', os.cpu_count(), platform.platform(), platform.python_version())" || exit 1
workers=$("$python" -c "import os; n = os.cpu_count() or 1
w = [2 ** k for k in range(8) if 2 ** k < n]
print(','.join(map(str, w + [n])))")
cases=(calls tasks items broadcast)
deadline=$((SECONDS + ${BUDGET:-540}))
for i in "${!cases[@]}"; do
    share=$(((deadline - SECONDS) / (${#cases[@]} - i)))
    echo "== ${cases[i]}: workers $workers, ${share} s"
    timeout -k 5 "$share" "$python" benchmarks/bench_scale.py --workers "$workers" \
        --cases "${cases[i]}" --timeout 60 --out "$out/${cases[i]}" \
        || { echo "== ${cases[i]} stopped (exit $?)"; pkill -9 -f 'bench_scale.py.*--child'; }
done
cat "$out"/*.md 2>/dev/null | grep -v '^$'
