#!/usr/bin/env bash
# GPU check, one short prepared run (about 5 minutes on an H100/H200; no test needs a GPU):
#   1. unbiasedness of a few estimators with every tensor on the device (toy, closed form);
#   2. bias against exact enumeration of a small binary VAE trained on the device;
#   3. the overhead benchmark at batch 1024 (StorchELBO vs hand-written vs Pyro's losses);
#   4. the comparison harness at batch 1024 (time per step, CUDA peak memory), validation
#      on (Pyro's default) and off;
# and prints the tables again at the end. Usage, from the repository root:
#   bash benchmarks/gpu_check.sh [OUT]          (OUT: output folder, default benchmarks/out/gpu)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
# Overridable for a dry run on a CPU: DEVICE=cpu STEPS=20 DRAWS=200 ROUNDS=1 BIAS=100
DEVICE=${DEVICE:-cuda}; STEPS=${STEPS:-300}; DRAWS=${DRAWS:-2000}; ROUNDS=${ROUNDS:-7}
BIAS=${BIAS:-1000}
OUT=${1:-${OUT:-benchmarks/out}/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    > "$OUT/device.txt" 2>/dev/null || echo "$DEVICE (no nvidia-smi)" > "$OUT/device.txt"
cat "$OUT/device.txt"

$PY -m benchmarks.gpu_unbiased --device "$DEVICE" --draws "$DRAWS" | tee "$OUT/unbiased.md" || status=1

$PY -m benchmarks.compare --device "$DEVICE" --latents 8 --steps 200 --seeds 0 --lr 1e-3 \
    --eval-every 200 --bias-samples "$BIAS" --methods sf-ma rloo arm disarm pyro:TraceGraph_ELBO \
    --no-plots --no-progress --out "$OUT/bias" > "$OUT/bias.log" 2>&1 || status=1

$PY -m benchmarks.overhead --device "$DEVICE" --batch-sizes 1024 --rounds "$ROUNDS" --steps 50 \
    | tee "$OUT/overhead.md" || status=1

for validation in on off; do
    flag=""; [ "$validation" = off ] && flag="--no-validation"
    $PY -m benchmarks.compare --device "$DEVICE" --batch-size 1024 --steps "$STEPS" --seeds 0 \
        --eval-every "$STEPS" --var-samples 0 --test-samples 0 $flag --no-plots --no-progress \
        --methods sf-ma torch:sf-ma rloo torch:rloo disarm torch:disarm pyro:Trace_ELBO \
        pyro:TraceGraph_ELBO --out "$OUT/vae-1024-validation-$validation" \
        > "$OUT/vae-1024-validation-$validation.log" 2>&1 || status=1
done

echo; echo "================ GPU check summary ($(cat "$OUT/device.txt")) ================"
echo "## unbiasedness on the device"; cat "$OUT/unbiased.md"
echo; echo "## bias against exact enumeration (binary VAE, 8 latents)"
cat "$OUT/bias/results.md" 2>/dev/null || tail -5 "$OUT/bias.log"
echo; echo "## overhead, batch 1024"; grep '^|' "$OUT/overhead.md"
for validation in on off; do
    echo; echo "## binary VAE on digits, batch 1024, validation $validation"
    grep '^|' "$OUT/vae-1024-validation-$validation/results.md" 2>/dev/null \
        || tail -5 "$OUT/vae-1024-validation-$validation.log"
done
exit $status
