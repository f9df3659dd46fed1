#!/usr/bin/env bash
# call 2: CUDA tests (spec graphs, no-sync add), c256+tpu main vs b656ff8, specab vs df7b289, specprof c1, c256 si8
set -u
O=$OUT; T0=$(date +%s)
left() { echo $(( 560 - ($(date +%s) - T0) )); }
OUT=$O/t bash benchmarks/run_gpu.sh env tests > /dev/null 2>&1
grep -E 'passed|failed|FAILED|Error' $O/t/tests.log | head -20
OUT=$O/h bash benchmarks/run_gpu.sh hostcost > /dev/null 2>&1
echo "left $(left)"
if [ $(left) -gt 200 ]; then
  rm -rf /tmp/venv-before /tmp/before; cp .old/spec-before.tar .old/before.tar
  SPEC_PROFILE_REQUESTS=1 OUT=$O/s timeout $(( $(left) - 40 )) bash benchmarks/run_gpu.sh specab specprof > /dev/null 2>&1
  grep -E '^code|identical|always|none|auto' $O/s/run.log | grep -v Traceback | head -30
  cut -c1-600 $O/s/spec_profile_c1.jsonl 2>/dev/null
fi
echo "left $(left)"
[ $(left) -gt 45 ] && OUT=$O/i bash benchmarks/run_gpu.sh c256si8 > /dev/null 2>&1
python3 .old/summ.py $O 2>&1 | grep -v '^ *$' | head -40
python3 - "$O" <<'P'
import json, glob, sys
for f in sorted(glob.glob(sys.argv[1] + "/**/bench_*.json", recursive=True)):
    d = json.load(open(f))
    for k, r in d.get("runs", {}).items():
        print(f.replace(sys.argv[1], ""), k, round(r["request_throughput"], 2), "req/s", round(r["output_throughput"]), "tok/s", "idle", round(r.get("engine", {}).get("device_idle_share", -1), 3))
P
