#!/usr/bin/env bash
# call 3: the SpecPolicy fix (auto at c16/c256, code workload; random c16), this tree only
set -u
rm -f .old/before.tar .old/spec-before.tar
OUT=$OUT/e bash benchmarks/run_gpu.sh env > /dev/null 2>&1
export PATH=/tmp/venv/bin:$PATH
timeout 120 python3 benchmarks/spec_bench.py --device cuda --workloads code --requests 256,16 --max-tokens 128 2>&1 | grep -E '^code' | grep async
timeout 60 python3 benchmarks/spec_bench.py --device cuda --workloads random --requests 16 --max-tokens 128 2>&1 | grep -E '^random' | grep async
