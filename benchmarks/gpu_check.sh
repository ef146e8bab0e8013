#!/usr/bin/env bash
# One GPU session: versions, the compiled-kernel tests, then the benchmark script.
# Usage (on the GPU machine, from the repository root): bash benchmarks/gpu_check.sh [tests|sweep|profile|bench|xmc]...
# Logs and the rewritten BENCHMARKS.md go to $OUT (default ./gpu_out). XMC_ARGS (a string) holds
# extra flags of benchmarks/xmc_trainer.py, e.g. XMC_ARGS="--labels 670091 --merge".
set -uo pipefail
R=$PWD
OUT=${OUT:-$R/gpu_out}; mkdir -p "$OUT"
# The installed wheel has no sparsejax.kernels mapping: lay the package out as setup.py does.
SRC=$(mktemp -d); cp -r sparsejax "$SRC/" && cp -r kernels "$SRC/sparsejax/kernels"
export PYTHONPATH=$SRC:$R PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 --version
  python3 -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__, jax.devices())"
} 2>&1 | tee "$OUT/versions.txt"
steps=("$@"); [ ${#steps[@]} -eq 0 ] && steps=(tests bench)
for step in "${steps[@]}"; do
  case $step in
    tests) (cd /tmp && SPARSEJAX_TEST_COMPILED=1 python3 -m pytest -o pythonpath= -p no:cacheprovider \
              --rootdir="$R" "$R/tests/test_kernels_fanin.py" "$R/tests/test_kernels_nm.py" -q 2>&1 \
              | tail -25 | tee "$OUT/tests.txt") ;;
    sweep) python3 benchmarks/kernels.py --nm_sweep --repeats 10 2>&1 | tee "$OUT/nm_sweep.txt" ;;
    profile) NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
             "$NCU" --set default --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
               --section Occupancy --section LaunchStats -k regex:"mask_kernel|dw_kernel" \
               python3 benchmarks/profile_kernels.py --which nm > "$OUT/ncu_nm.txt" 2>&1
             tail -5 "$OUT/ncu_nm.txt" ;;
    bench) python3 benchmarks/kernels.py --max_dense_gib 40 2>&1 | tee "$OUT/bench.txt"; cp BENCHMARKS.md "$OUT/" ;;
    xmc) read -ra xmc_args <<< "${XMC_ARGS:-}"
         python3 benchmarks/xmc_trainer.py "${xmc_args[@]}" 2>&1 | tee "$OUT/xmc.txt"; cp BENCHMARKS.md "$OUT/" ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
