#!/bin/sh
# A/B of the adaptive split point (bal) vs a fixed half (half) vs no split, same runs interleaved.
cd /tmp
R=/work/wt-cpu23d/benchmarks/results/2026-12-03-cpu-c
B="/work/wt-cpu23d/.venv/bin/python /work/wt-cpu23d/benchmarks/cpu_bench.py e2e"
V='--variant bal: --variant half:env:AIOSCHED_CPU_SPLIT_FRAC=0.5 --variant nosplit:env:AIOSCHED_CPU_SPLIT=0'
$B --model /work/ckpt256 --rounds 2 $V --out $R/ab256 > $R/ab256.log 2>&1
# the same with one busy process on a core (a python spin loop), as another session's tests would be
python3 -c "while True: pass" & BURN=$!
$B --model /work/ckpt256 --rounds 2 $V --out $R/ab256burn > $R/ab256burn.log 2>&1
kill $BURN
$B --model /work/ckpt1024 --rounds 1 $V --out $R/ab1024 > $R/ab1024.log 2>&1
