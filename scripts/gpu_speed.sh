#!/usr/bin/env bash
# GPU evidence for issue 5 (docs/benchmarks.md): the CUDA-graph / fused-loss tests against the eager step on
# the card, then benchmarks/throughput.py (PARTS selects its parts) with its output under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/card.txt
if [ "${TESTS:-1}" = 1 ]; then
  timeout "${TEST_LIMIT:-240}" python3 -m pytest -q -m gpu tests/test_packed_gpu.py -x -W ignore > $OUT/gpu_tests.txt 2>&1
  echo "gpu tests rc=$?" | tee -a $OUT/gpu_tests.txt; tail -3 $OUT/gpu_tests.txt
fi
python3 benchmarks/throughput.py --out $OUT/bench.json --parts "${PARTS:-baseline,packed,eager,compiled,profile}" \
  ${BENCH_ARGS:-} > $OUT/bench.log 2>&1
echo "bench rc=$?"; grep -v "^\[bench\]" $OUT/bench.log | grep -v -i "warn" | tail -25
if [ "${EXTRA:-0}" = 1 ]; then  # attention without cuDNN, then the default rank study timed end to end
  python3 benchmarks/throughput.py --out $OUT/bench_flash.json --parts compiled --compiled 16,32 --no-cudnn-attention \
    > $OUT/bench_flash.log 2>&1; echo "flash rc=$?"; grep -E "^packed|^ceiling" $OUT/bench_flash.log
  python3 benchmarks/throughput.py --out $OUT/study.json --parts study > $OUT/study.log 2>&1
  echo "study rc=$?"; grep -E "rank study" $OUT/study.log
fi
