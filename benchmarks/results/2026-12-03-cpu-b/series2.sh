#!/bin/sh
# Issue 23, 2026-12-03, second series, part 2: the same code, more rounds (3 on 256 and 512, 2 on 1024).
R=/work/wt23/benchmarks/results/2026-12-03-cpu-b/series2
B=/work/wt23/benchmarks/cpu_bench.py
PY=/work/wt23/.venv/bin/python
mkdir -p $R
cd /tmp
echo "start $(date -u) $(uptime)"
git -C /work/wt23 log --oneline -1
$PY $B e2e --model /work/ckpt512 --vllm /work/vllm-venv/bin/vllm --rounds 3 --variant "after:" --out $R/e2e512 > $R/e2e512.txt 2>&1
echo "512 done $(date -u) $(uptime)"
$PY $B e2e --model /work/ckpt1024 --num-prompts 32 --vllm /work/vllm-venv/bin/vllm --rounds 2 --variant "after:" --out $R/e2e1024 > $R/e2e1024.txt 2>&1
echo "1024 done $(date -u) $(uptime)"
$PY $B e2e --model /work/ckpt256 --vllm /work/vllm-venv/bin/vllm --rounds 3 --variant "after:" --out $R/e2e256 > $R/e2e256.txt 2>&1
echo "256 done $(date -u) $(uptime)"
