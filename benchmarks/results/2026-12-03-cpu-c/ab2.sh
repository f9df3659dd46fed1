#!/bin/sh
# A/B of SplitChoice (auto, the default) vs always splitting (forced) vs no split, quiet and with one busy core.
cd /tmp
R=/work/wt-cpu23d/benchmarks/results/2026-12-03-cpu-c
B="/work/wt-cpu23d/.venv/bin/python /work/wt-cpu23d/benchmarks/cpu_bench.py e2e"
V='--variant auto: --variant forced:env:AIOSCHED_CPU_SPLIT=1 --variant nosplit:env:AIOSCHED_CPU_SPLIT=0'
python3 -c "while True: pass" & BURN=$!
$B --model /work/ckpt256 --rounds 2 $V --out $R/ab2_256burn > $R/ab2_256burn.log 2>&1
kill $BURN
$B --model /work/ckpt256 --rounds 2 $V --out $R/ab2_256 > $R/ab2_256.log 2>&1
