#!/bin/sh
# Issue 23 third series: aiosched (split default, and AIOSCHED_CPU_SPLIT=0) vs vLLM-CPU 0.32, interleaved rounds.
cd /tmp
R=/work/wt-cpu23d/benchmarks/results/2026-12-03-cpu-c
for m in 1024 512 256; do
  /work/wt-cpu23d/.venv/bin/python /work/wt-cpu23d/benchmarks/cpu_bench.py e2e --model /work/ckpt$m --vllm /work/vllm-venv/bin/vllm \
      --rounds 2 --variant "split:" --variant "nosplit:env:AIOSCHED_CPU_SPLIT=0" --out $R/e2e$m > $R/e2e$m.log 2>&1
done
