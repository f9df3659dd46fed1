#!/usr/bin/env bash
# call 1: spec18c CUDA tests, c256 main vs b656ff8(+probe) twice, GIL switch interval variant, specab vs df7b289, specprof, structured
set -u
O=$OUT
export HOSTCOST_TPU=0
OUT=$O/t bash benchmarks/run_gpu.sh env tests > /dev/null 2>&1
OUT=$O/r1 bash benchmarks/run_gpu.sh hostcost > /dev/null 2>&1
export PATH=/tmp/venv/bin:$PATH
C256="--random-weights llama-3.2-1b --device cuda --disable-tqdm --ignore-eos --num-kv-blocks 8192 --input-len 230 --output-len 120 --num-prompts 1000 --max-concurrency 256 --max-num-seqs 256 --max-num-batched-tokens 2048 --no-enable-prefix-caching --compare async"
si=0.0005; mkdir -p $O/si$si; python3 .old/swi.py $si -m aiosched.bench $C256 --json $O/si$si/bench_c256.json > $O/si$si/log 2>&1
mv /tmp/venv-before /tmp/venv-before-b656; mv /tmp/before /tmp/before-b656; cp .old/before.tar .old/b656.tar; cp .old/spec-before.tar .old/before.tar
OUT=$O/s bash benchmarks/run_gpu.sh specab specprof > /dev/null 2>&1
python3 .old/summ.py $O
rm -rf /tmp/venv-before /tmp/before; mv /tmp/venv-before-b656 /tmp/venv-before; mv /tmp/before-b656 /tmp/before
OUT=$O/r2 bash benchmarks/run_gpu.sh hostcost > /dev/null 2>&1
mkdir -p $O/st
STR="--device cuda --random-weights llama-3.2-1b --concurrency 64 --num-requests 128 --output-len 128 --repeats 1 --modes async --fracs 0.25,1.0 --grammar-threads 8"
python3 benchmarks/structured_bench.py $STR > $O/st/default.log 2>&1
python3 .old/swi.py 0.0002 benchmarks/structured_bench.py $STR > $O/st/si0002.log 2>&1
python3 .old/summ.py $O | grep -v '^ *$' | head -60
tail -n 6 $O/st/*.log
