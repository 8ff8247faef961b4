#!/usr/bin/env bash
# The GPU checks of issue 6 in one command, for a session lent a GPU machine (see BENCHMARKS.md,
# "Running the GPU checks"): the CuPy tests, then the GPU benchmarks, each under its own time limit,
# every output written to $OUT (the device tool's result folder) or ./gpu-results.
#
#   bash benchmarks/gpu_session.sh            # about 6-8 minutes on an H100
#
# The machine has CuPy, NumPy, SciPy, tifffile, pandas, rich, pyyaml, matplotlib and threadpoolctl;
# the project's other dependencies travel as wheels in .whl/ (installed here when present).
set -u
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" | tee "$out/error.txt"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi

step() {  # step NAME SECONDS COMMAND...: run with a limit, keep the output, never stop the script
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date +%T), limit ${limit}s)"
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  echo "   exit $? -> $out/$name.txt"
  tail -n 4 "$out/$name.txt"
}

step gpu 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step pytest_gpu 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests
step engine_k3_gpu 120 python3 benchmarks/engine_k3.py --device gpu --repeat 3
step local_speed_gpu 120 python3 benchmarks/local_speed.py --device gpu --repeat 3
step k3_tiff_worker_gpu 150 python3 benchmarks/k3_movie.py --device gpu --format tiff --worker 6
step k3_eer_worker_gpu 150 python3 benchmarks/k3_movie.py --device gpu --format eer --worker 6
echo "done $(date +%T)"
