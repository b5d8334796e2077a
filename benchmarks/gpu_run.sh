#!/usr/bin/env bash
# The prepared check for a lent GPU machine: one call of under 9 minutes.
#
# It unpacks flowplug from a wheel built beforehand (no network there; the machine's own
# torch, numpy, h5py, pluggy and pytest are used), runs the CUDA tests (tests/test_cuda_exact.py,
# tests/test_cuda_flows.py, tests/test_cuda_paths.py and the Dirac operators' CUDA tests),
# then the CPU batch-independence test of every flow layer on that machine's CPU (1, 2, 4, 16 threads),
# training under torchrun with nccl (one process; two on one GPU must be refused by name),
# then benchmarks/gpu.py (absolute figures on the GPU, each next to the CPU figure of the same
# machine). Every part has its own time limit and writes its log under $OUT, so a part that
# fails or runs long costs only itself. With PARTS_LIMIT > 0 (seconds) it also runs
# benchmarks/gpu_parts.py (SU(3) HMC parts, kernel launches per training step).
#
# Before the call, on the development machine (from the repository root):
#     echo /.whl/ >> .git/info/exclude     # once
#     rm -rf .whl && pip wheel -q --no-deps --no-build-isolation -w .whl .
# then run `bash benchmarks/gpu_run.sh` there with `.whl` carried along.
#
# python3 -P keeps the source folder flowplug/ of the checkout off sys.path, so that the
# installed package (which maps plugins/ and adapters/ into flowplug.*) is the one imported
# (PYTHONSAFEPATH=1 does the same for the processes that torchrun starts).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-$(mktemp -d)}"
TEST_LIMIT="${TEST_LIMIT:-200}"
BENCH_LIMIT="${BENCH_LIMIT:-320}"
site="$(mktemp -d)"
# unpacked, not pip-installed: the wheel is tagged for this machine's Python (it holds the
# compiled extension flowplug._compiled); where the GPU machine's Python differs, the
# extension does not import there and flowplug.compiled falls back to numpy
python3 -m zipfile -e .whl/flowplug-*.whl "$site" >"$OUT/install.log" 2>&1 \
    || { cat "$OUT/install.log"; exit 1; }
export PYTHONPATH="$site"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
    python3 -P -c "import sys, torch, flowplug; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'flowplug', flowplug.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA', 'cpu threads', torch.get_num_threads())"
} 2>&1 | tee "$OUT/env.txt"
echo "== CUDA tests (limit ${TEST_LIMIT} s)"
timeout "$TEST_LIMIT" python3 -P -m pytest -q -p no:cacheprovider -rs --durations=8 tests/test_cuda_exact.py tests/test_cuda_flows.py tests/test_cuda_paths.py \
    tests/test_dirac.py::test_operator_runs_on_the_links_device \
    tests/test_preconditioning.py::test_even_odd_runs_on_the_links_device 2>&1 | tee "$OUT/tests.txt" | tail -40
echo "tests exit: ${PIPESTATUS[0]}"
echo "== each configuration of a batch inverts alone on this machine's CPU (the test sets 1, 2, 4 and 16 threads)"
OMP_WAIT_POLICY=PASSIVE timeout 150 python3 -P -m pytest -q -p no:cacheprovider tests/test_flow_layers.py -k each_configuration 2>&1 \
    | tail -3 | tee "$OUT/cpu_batch.txt"
echo "== torchrun on the GPU (nccl, one process), then two processes on one GPU (refused by name)"
{
    PYTHONSAFEPATH=1 timeout 120 python3 -P -m torch.distributed.run --standalone --nproc_per_node=1 -m flowplug train \
        --config examples/train_phi4.toml --no-progress --set device="'cuda'" --set train.steps=5 \
        --set out="'$(mktemp -d)/nccl1'" 2>&1 | tail -6
    echo "nccl world of one exit: ${PIPESTATUS[0]}"
    PYTHONSAFEPATH=1 timeout 120 python3 -P -m torch.distributed.run --standalone --nproc_per_node=2 -m flowplug train \
        --config examples/train_phi4.toml --no-progress --set device="'cuda'" --set train.steps=5 \
        --set out="'$(mktemp -d)/nccl2'" 2>&1 | grep -i -m3 "error\|cuda:1"
} 2>&1 | tee "$OUT/torchrun.txt"
echo "== benchmarks/gpu.py (limit ${BENCH_LIMIT} s)"
timeout "$BENCH_LIMIT" python3 -P benchmarks/gpu.py --budget "${BUDGET:-3}" ${GPU_ARGS:-} 2>"$OUT/gpu.err" | tee "$OUT/gpu.jsonl"
echo "benchmark exit: ${PIPESTATUS[0]}"
tail -5 "$OUT/gpu.err"
if [ "${PARTS_LIMIT:-0}" -gt 0 ]; then
    echo "== benchmarks/gpu_parts.py (limit ${PARTS_LIMIT} s)"
    timeout "$PARTS_LIMIT" python3 -P benchmarks/gpu_parts.py --repeat "${PARTS_REPEAT:-5}" 2>"$OUT/parts.err" | tee "$OUT/parts.jsonl"
    echo "parts exit: ${PIPESTATUS[0]}"
fi
