#!/usr/bin/env bash
# The CUDA fast-path table in one device call (issue 4). Run from the repo root:
#   bash benchmarks/run_gpu.sh [stage ...]      stages: env tests decode tune hf tpu c256 c256ab profile c256big c256prof mp c256si8 spec specab specwide specpol specprof structured structslices gramprocs handoff hostcost families before beforedecode pdl attn qkv
#   (default: env tests decode hf tpu c256 profile; `beforedecode`: the older tree's decode-step kernel profile)
# Writes JSON and logs under $OUT (default /tmp/aiosched-gpu). Needs the wheels in .whl/ (msgspec, pyzmq, pytest-asyncio, llguidance).
# TAR_TO=FILE: also pack all of $OUT into FILE when the script ends, killed by a timeout included (the device
# tool returns at most 8 files of a call: run it with OUT=/tmp/o TAR_TO=$OUT/results.tgz).
set -uo pipefail
OUT=${OUT:-/tmp/aiosched-gpu}
mkdir -p "$OUT"
# The device image has torch/triton/jax but not msgspec, pyzmq, pytest-asyncio, llguidance:
# carried as wheels in .whl/. The project installs editable into a venv over the image's
# packages, so `aiosched.executors` maps to this checkout's executors/ (pyproject's package-dir).
# make_venv VENV TREE: a venv over the image's packages with the wheels and TREE installed editable.
make_venv() {
  local venv=$1 tree=$2 image_site
  image_site=$(python3 -c 'import site; print(site.getsitepackages()[0])')  # the image's python3 is itself a venv
  python3 -m venv "$venv"
  "$venv/bin/python" -c 'import site, sys; open(site.getsitepackages()[0] + "/image.pth", "w").write(sys.argv[1] + "\n")' "$image_site"
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$venv/bin/python" -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | grep -v WARNING
  fi
  (cd "$tree" && "$venv/bin/python" -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | grep -v WARNING)
}
[ -x /tmp/venv/bin/python ] || make_venv /tmp/venv .
# Stage `before`: the same decode/tpu/c256 stages on an older tree, in this call (host speed
# differs between lent machines by up to 30%, so before/after is only fair on one machine).
# Make the tree with `git archive REF -o .old/before.tar` and carry `.old`; results go to $OUT/before/.
if [[ " ${*:-} " == *" before"* || " ${*:-} " == *" specab "* || " ${*:-} " == *" specwide "* || " ${*:-} " == *" hostcost "* || " ${*:-} " == *" c256ab "* ]] && [ -f .old/before.tar ] && [ ! -x /tmp/venv-before/bin/python ]; then
  rm -rf /tmp/before && mkdir -p /tmp/before && tar -xf .old/before.tar -C /tmp/before
  # A tar may leave out the embedded model's weights (the carry limit): the same file as here.
  m=aiosched/default_model/model.safetensors
  [ -f /tmp/before/$m ] || cp $m /tmp/before/$m
  make_venv /tmp/venv-before /tmp/before
fi
export PATH=/tmp/venv/bin:$PATH
export PYTHONUNBUFFERED=1
STAGES=${*:-env tests decode hf tpu c256 profile}
SHAPE=${SHAPE:-llama-3.2-1b}
LOG="$OUT/run.log"
has() { [[ " $STAGES " == *" $1 "* ]]; }
pack() { [ -n "${TAR_TO:-}" ] && tar czf "$TAR_TO" -C "$OUT" . 2>/dev/null; }
trap 'pack' EXIT
trap 'exit 143' TERM
say() { echo "=== $* ($(date +%T))" | tee -a "$LOG"; }
BENCH="python3 -m aiosched.bench --random-weights $SHAPE --device cuda --disable-tqdm --ignore-eos --num-kv-blocks 8192"

if has env; then
  say env
  { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv;
    python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name())'; } 2>&1 | tee -a "$LOG"
fi
if has tests; then
  say kernel tests
  python3 -m pytest -q -p no:cacheprovider $(ls tests/test_triton_kernels.py tests/test_cuda_runner.py 2>/dev/null) 2>&1 | tail -60 | tee -a "$LOG" "$OUT/tests.log"
  say "speculative decoding tests on the GPU (float32: greedy identity, extras beside drafting requests, seeded)"
  AIOSCHED_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/test_spec_decode.py -k "torch or cuda" 2>&1 | tail -30 | tee -a "$LOG" "$OUT/tests.log"
fi
if has decode; then
  say decode-step microbench
  python3 benchmarks/decode_step.py --shape "$SHAPE" --batch-sizes 1,3,256 --ctx 300 --variants best,fused,torch --kernel-profile --json "$OUT/decode.json" 2>&1 | tee -a "$LOG"
fi
if has tune; then
  say "decode step with the skinny-GEMM sweep (split-K included): default configs, then the sweep's best per projection"
  python3 benchmarks/decode_step.py --shape "$SHAPE" --batch-sizes 1,3,256 --ctx 300 --variants best --kernel-profile --json "$OUT/decode_default.json" 2>&1 | tee -a "$LOG"
  python3 benchmarks/decode_step.py --shape "$SHAPE" --batch-sizes 1,3,256 --ctx 300 --variants best --tune --kernel-profile --json "$OUT/decode_tuned.json" 2>&1 | tee -a "$LOG" "$OUT/tune.log"
fi
if has pdl; then
  # issue 21: Programmatic Dependent Launch of the decode-path Triton kernels, off then on (two
  # processes: each compiles and captures its own graphs), the batch-1 step is the target
  say "decode step without, then with PDL (--pdl), kernel profile"
  for mode in off on; do
    flag=--no-pdl; [ $mode = on ] && flag=--pdl
    python3 benchmarks/decode_step.py --shape "$SHAPE" --batch-sizes 1,3,256 --ctx 300 --variants best --kernel-profile $flag \
      --json "$OUT/decode_pdl_$mode.json" 2>&1 | tee -a "$LOG"
  done
fi
if has attn; then
  # issue 21: the decode attention kernel's launch shapes, per-kv-head programs vs all kv heads of a request in one program
  say "decode attention: the per-kv-head defaults vs the all-heads grid, batch ${ATTN_BATCHES:-1,64,256} at 300 tokens"
  python3 benchmarks/attention_tune.py --batch-sizes ${ATTN_BATCHES:-1,64,256} --ctx 300 --quick --json "$OUT/attn.json" 2>&1 | tee -a "$LOG"
  say "decode step, attention per kv head then all heads per program from batch ${ALL_HEADS_FROM:-160} (ALL_HEADS_FROM; the default)"
  for mode in off on; do
    flag="--attn-all-heads off"; [ $mode = on ] && flag="--attn-all-heads ${ALL_HEADS_FROM:-160}"
    python3 benchmarks/decode_step.py --shape "$SHAPE" --batch-sizes 1,256 --ctx 300 --variants best --no-eager $flag \
      --json "$OUT/decode_allheads_$mode.json" 2>&1 | tee -a "$LOG"
  done
fi
if has qkv; then
  # issue 21: with PDL on (the default), does the qkv GEMV with the input norm as its skinny prologue beat norm + cuBLAS?
  say "decode step: qkv on cuBLAS after a norm kernel (default), then the skinny GEMM with the norm prologue, kernel profile"
  for mode in off on; do
    flag=; [ $mode = on ] && flag=--skinny-qkv
    python3 benchmarks/decode_step.py --shape "$SHAPE" --batch-sizes 1,3 --ctx 300 --variants best --no-eager --kernel-profile $flag \
      --json "$OUT/decode_qkv_$mode.json" 2>&1 | tee -a "$LOG"
  done
fi
if has hf; then
  say HF transformers generate baseline
  python3 benchmarks/hf_baseline.py --shape "$SHAPE" --input-len 230 --output-len 120 --batch-sizes 1,3 --json "$OUT/hf.json" 2>&1 | grep -v Warning | tee -a "$LOG"
fi
if has tpu; then
  say "tpu-inference workload: 230/120, 200 prompts, concurrency 3"
  $BENCH --input-len 230 --output-len 120 --num-prompts 200 --max-concurrency 3 --max-num-seqs 256 --max-num-batched-tokens 512 \
    --no-enable-prefix-caching --compare sync,async --json "$OUT/bench_tpu.json" 2>&1 | tee -a "$LOG"
fi
if has c256; then
  say "concurrency 256: 230/120, 1000 prompts"
  $BENCH --input-len 230 --output-len 120 --num-prompts 1000 --max-concurrency 256 --max-num-seqs 256 --max-num-batched-tokens 2048 \
    --no-enable-prefix-caching --compare sync,async --json "$OUT/bench_c256.json" 2>&1 | tee -a "$LOG"
fi
if has profile; then
  say "profile: idle share between steps (tpu workload, 60 prompts)"
  $BENCH --input-len 230 --output-len 120 --num-prompts 60 --max-concurrency 3 --max-num-seqs 256 --max-num-batched-tokens 512 \
    --no-enable-prefix-caching --compare sync,async --profile /tmp/aiosched-prof --profile-start-step 50 --profile-steps 40 \
    --json "$OUT/bench_profile.json" 2>&1 | tee -a "$LOG"
fi
if has c256big; then
  say "concurrency 256 with max-num-batched-tokens 8192 (fewer, larger mixed steps)"
  $BENCH --input-len 230 --output-len 120 --num-prompts 1000 --max-concurrency 256 --max-num-seqs 256 --max-num-batched-tokens 8192 \
    --no-enable-prefix-caching --compare sync,async --json "$OUT/bench_c256_8192.json" 2>&1 | tee -a "$LOG"
fi
if has c256prof; then
  say "profile: concurrency 256, async, 30 steps traced"
  $BENCH --input-len 230 --output-len 120 --num-prompts 400 --max-concurrency 256 --max-num-seqs 256 --max-num-batched-tokens 2048 \
    --no-enable-prefix-caching --compare async --profile /tmp/aiosched-prof256 --profile-start-step 40 --profile-steps 30 \
    --json "$OUT/bench_c256_profile.json" 2>&1 | tee -a "$LOG"
  python3 benchmarks/trace_summary.py /tmp/aiosched-prof256/trace_profile_async.json --top 30 2>&1 | tee -a "$LOG" "$OUT/c256_trace_summary.txt"
fi
if has mp; then
  say "multiproc executor (TP=1, one GPU): greedy parity with inproc, then the tpu workload sync vs async"
  python3 benchmarks/executor_parity.py --device cuda --random-weights "$SHAPE" --variants inproc:1,multiproc:1 \
    --num-prompts 16 --max-tokens 64 --json "$OUT/parity_multiproc.json" 2>&1 | tee -a "$LOG"
  $BENCH --executor multiproc --input-len 230 --output-len 120 --num-prompts 200 --max-concurrency 3 --max-num-seqs 256 \
    --max-num-batched-tokens 512 --no-enable-prefix-caching --compare sync,async --json "$OUT/bench_tpu_multiproc.json" 2>&1 | tee -a "$LOG"
fi
if has c256si8; then
  say "concurrency 256 with --stream-interval 8"
  $BENCH --input-len 230 --output-len 120 --num-prompts 1000 --max-concurrency 256 --max-num-seqs 256 --max-num-batched-tokens 2048 \
    --no-enable-prefix-caching --stream-interval 8 --compare async --json "$OUT/bench_c256_si8.json" 2>&1 | tee -a "$LOG"
fi
if has spec; then
  say "speculative decoding: none / always / auto (SpecPolicy), sync and async, concurrency 1..256 x 128 tokens"
  python3 benchmarks/spec_bench.py --device cuda --random-weights "$SHAPE" --workloads code,random --requests 1,4,16,64,256 \
    --max-tokens 128 --json "$OUT/spec.json" 2>&1 | tee -a "$LOG"
  say "speculative decoding with every 4th request penalised (verified without drafts; the others keep theirs)"
  python3 benchmarks/spec_bench.py --device cuda --random-weights "$SHAPE" --workloads code --requests 16,64 --extras-every 4 \
    --max-tokens 128 --json "$OUT/spec_extras.json" 2>&1 | tee -a "$LOG"
fi
if has specab; then
  say "speculation, code workload (embedded model): this tree, then the before tree, same machine"
  python3 benchmarks/spec_bench.py --device cuda --workloads code --requests ${SPEC_REQUESTS:-1,16,256} --max-tokens 128 \
    --json "$OUT/spec_code.json" 2>&1 | tee -a "$LOG"
  if [ -x /tmp/venv-before/bin/python ]; then
    mkdir -p "$OUT/before"
    (cd /tmp/before && /tmp/venv-before/bin/python benchmarks/spec_bench.py --device cuda --workloads code --requests ${SPEC_BEFORE_REQUESTS:-1,16} \
       --max-tokens 128 --json "$OUT/before/spec_code.json") 2>&1 | tee -a "$LOG"
  fi
fi
if has specwide; then
  say "speculation past max_num_seqs tokens (c64, c256): verify-step graphs (this tree) vs eager verify (before tree), async, runs interleaved"
  python3 benchmarks/spec_bench.py --device cuda --workloads code --requests ${SPECWIDE_REQUESTS:-64,256} --modes async \
    --variants none,always,none,always --max-tokens 128 --json "$OUT/spec_wide.json" 2>&1 | tee -a "$LOG"
  if [ -x /tmp/venv-before/bin/python ]; then
    mkdir -p "$OUT/before"
    (cd /tmp/before && /tmp/venv-before/bin/python benchmarks/spec_bench.py --device cuda --workloads code --requests ${SPECWIDE_REQUESTS:-64,256} \
       --modes async --variants none,always,none,always --max-tokens 128 --json "$OUT/before/spec_wide.json") 2>&1 | tee -a "$LOG"
  fi
fi
if has specpol; then
  say "speculation auto vs none vs always, async, with what the SpecPolicy measured per phase (code and random workloads)"
  python3 benchmarks/spec_bench.py --device cuda --random-weights "$SHAPE" --workloads ${SPECPOL_WORKLOADS:-code,random} \
    --requests ${SPECPOL_REQUESTS:-16,256} --modes async --max-tokens 128 --policy-log --json "$OUT/spec_policy.json" 2>&1 | tee -a "$LOG"
fi
if has specprof; then
  say "a speculative step's host phases and device time vs a plain step (code workload, always on)"
  for c in ${SPEC_PROFILE_REQUESTS:-1 16}; do
    python3 benchmarks/spec_step_profile.py --device cuda --requests "$c" --max-tokens 128 --trace 2>&1 | grep '^{' | tee -a "$LOG" "$OUT/spec_profile_c$c.jsonl"
  done
fi
if has structured; then
  say "structured output, concurrency 64, async: 25% and 100% constrained, mask threads ${GRAMMAR_THREADS:-8,15}"
  python3 benchmarks/structured_bench.py --device cuda --random-weights "$SHAPE" --concurrency 64 --num-requests 128 --output-len 128 \
    --repeats ${STRUCT_REPEATS:-1} --modes async --fracs 0.25,1.0 --grammar-threads ${GRAMMAR_THREADS:-8,15} --validate 64 2>&1 | tee -a "$LOG" "$OUT/structured.log"
fi
if has structslices; then
  # issue 18: llguidance's default token slices vs the worker's STRING_SLICES (AIOSCHED_LLG_SLICES), same run
  say "structured output, concurrency 64, async: 25% and 100% constrained, default slices vs ours"
  python3 benchmarks/structured_bench.py --device cuda --random-weights "$SHAPE" --concurrency 64 --num-requests 128 --output-len 128 \
    --repeats ${STRUCT_REPEATS:-1} --modes async --fracs 0.25,1.0 --slices default,ours --validate 64 2>&1 | tee -a "$LOG" "$OUT/structslices.log"
fi
if has handoff; then
  # issue 17: the inproc executor's launch handoff (AIOSCHED_LAUNCH_HANDOFF) off and on, alternating, c256 async
  say "c256 async, launch handoff off / on alternating (${HANDOFF_ROUNDS:-1 2})"
  C256="--input-len 230 --output-len 120 --num-prompts 1000 --max-concurrency 256 --max-num-seqs 256 --max-num-batched-tokens 2048 --no-enable-prefix-caching --compare async"
  for r in ${HANDOFF_ROUNDS:-1 2}; do
    for h in 0 1; do
      AIOSCHED_LAUNCH_HANDOFF=$h $BENCH $C256 --json "$OUT/bench_c256_handoff${h}_r$r.json" 2>&1 \
        | grep -E "Output throughput|Mean step|schedule \(|update \(|wait on|Device idle|host was late|waiting inside|Engine steps" | sed "s/^/[handoff=$h r$r] /" | tee -a "$LOG"
    done
  done
fi
if has gramprocs; then
  # issue 18: does the mask fill scale with processes (own tokenizer and matchers each) where llguidance's threads stop?
  say "llguidance fill: one thread, LLExecutor threads, worker processes (16 and 64 masks, deep in the document)"
  python3 benchmarks/grammar_parallel.py --rows 16,64 --threads ${GRAM_THREADS:-1,4,8,15} --hows serial,executor,procs --skip 28 --steps 60 \
    2>&1 | tee -a "$LOG" "$OUT/grammar_parallel.log"
fi
if has hostcost; then
  say "engine host cost (issue 17): tpu (sync, async) and c256 (async), this tree then the before tree, same machine"
  TPU="--input-len 230 --output-len 120 --num-prompts 200 --max-concurrency 3 --max-num-seqs 256 --max-num-batched-tokens 512 --no-enable-prefix-caching"
  C256="--input-len 230 --output-len 120 --num-prompts 1000 --max-concurrency 256 --max-num-seqs 256 --max-num-batched-tokens 2048 --no-enable-prefix-caching"
  $BENCH $C256 --compare async --json "$OUT/bench_c256.json" 2>&1 | tee -a "$LOG"
  [ "${HOSTCOST_TPU:-1}" = 1 ] && $BENCH $TPU --compare sync,async --json "$OUT/bench_tpu.json" 2>&1 | tee -a "$LOG"
  if [ -x /tmp/venv-before/bin/python ]; then
    mkdir -p "$OUT/before"
    (cd /tmp/before && B="/tmp/venv-before/bin/python -m aiosched.bench --random-weights $SHAPE --device cuda --disable-tqdm --ignore-eos --num-kv-blocks 8192" &&
     $B $C256 --compare async --json "$OUT/before/bench_c256.json" &&
     if [ "${HOSTCOST_TPU:-1}" = 1 ]; then $B $TPU --compare sync,async --json "$OUT/before/bench_tpu.json"; fi) 2>&1 | tee -a "$LOG"
  fi
fi
if has c256ab; then
  # The two trees alternate (A B A B), each with its own Triton cache (kernels compiled counted per
  # run): on the H200 (2026-12-06) each run of the same work was slower than the one before it, by
  # as much as the change under test, so one tree run after the other is not a comparison.
  say "c256 async, this tree (A) and the before tree (B) alternating, own Triton caches; kernels compiled per run"
  mkdir -p "$OUT/before"
  C256="--input-len 230 --output-len 120 --num-prompts 1000 --max-concurrency 256 --max-num-seqs 256 --max-num-batched-tokens 2048 --no-enable-prefix-caching --compare async"
  for r in ${C256AB_ROUNDS:-1 2}; do
    for t in A B; do
      if [ $t = A ]; then dir=.; py=python3; json="$OUT/bench_c256_ab$r.json"; else dir=/tmp/before; py=/tmp/venv-before/bin/python; json="$OUT/before/bench_c256_ab$r.json"; fi
      [ -x "$py" ] || [ "$py" = python3 ] || continue
      cache=/tmp/triton-cache-$t; mkdir -p $cache; n0=$(find $cache -name '*.json' | wc -l)
      (cd $dir && TRITON_CACHE_DIR=$cache $py -m aiosched.bench --random-weights $SHAPE --device cuda --disable-tqdm --ignore-eos --num-kv-blocks 8192 $C256 --json "$json") 2>&1 \
        | grep -E "Output throughput|Mean step|schedule \(|update \(|wait on|Device idle|host was late|Engine steps|Triton kernels" | sed "s/^/[$t$r] /" | tee -a "$LOG"
      echo "[$t$r] Triton cache .json files added by this process (startup included): $(( $(find $cache -name '*.json' | wc -l) - n0 ))" | tee -a "$LOG"
    done
  done
fi
if has families; then
  say "model families on CUDA (Gemma 2/3, Phi-3, Qwen3-MoE vs HF)"
  # JAX's default device here is the GPU while the tests ask the jax runner for device="cpu":
  # this checks that every array and program stays on the runner's device.
  python3 -m pytest -q -p no:cacheprovider tests/test_model_families.py 2>&1 | tail -40 | tee -a "$LOG" "$OUT/families.log"
fi
if has before && [ -x /tmp/venv-before/bin/python ]; then
  say "before: the older tree's decode, tpu and c256 on this machine"
  mkdir -p "$OUT/before"
  (cd /tmp/before && B="/tmp/venv-before/bin/python -m aiosched.bench --random-weights $SHAPE --device cuda --disable-tqdm --ignore-eos --num-kv-blocks 8192" &&
   /tmp/venv-before/bin/python benchmarks/decode_step.py --shape "$SHAPE" --batch-sizes 1,3,256 --ctx 300 --variants best --json "$OUT/before/decode.json" &&
   $B --input-len 230 --output-len 120 --num-prompts 200 --max-concurrency 3 --max-num-seqs 256 --max-num-batched-tokens 512 \
     --no-enable-prefix-caching --compare sync,async --json "$OUT/before/bench_tpu.json" &&
   $B --input-len 230 --output-len 120 --num-prompts 1000 --max-concurrency 256 --max-num-seqs 256 --max-num-batched-tokens 2048 \
     --no-enable-prefix-caching --compare async --json "$OUT/before/bench_c256.json") 2>&1 | tee -a "$LOG"
fi
if has beforedecode && [ -x /tmp/venv-before/bin/python ]; then
  say "before: the older tree's decode step with its kernel profile, on this machine"
  mkdir -p "$OUT/before"
  (cd /tmp/before && /tmp/venv-before/bin/python benchmarks/decode_step.py --shape "$SHAPE" --batch-sizes 1,3,256 --ctx 300 \
     --variants best --kernel-profile --no-eager --json "$OUT/before/decode_profile.json") 2>&1 | tee -a "$LOG"
fi
say done
