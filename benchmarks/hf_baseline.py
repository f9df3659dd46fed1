"""Baseline: HF transformers `generate()` on a random-weight model of a given shape.

Greedy, exactly --output-len new tokens (no EOS), batch sizes given by --batch-sizes;
prints and writes (--json) seconds, ms per decode step and output tok/s per batch size.

    python benchmarks/hf_baseline.py --shape llama-3.2-1b --input-len 230 --output-len 120 --batch-sizes 1,3,64 --json hf.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_shape(shape: str) -> dict:
    if os.path.isfile(shape):
        with open(shape) as f:
            return json.load(f)
    try:
        from aiosched.executors.torch.random_checkpoint import shape_config
    except ImportError:  # before the runner's random-weights module: the decode bench's copy of the shape
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from decode_step import load_shape as _ls

        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **_ls(shape)}
    return shape_config(shape)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama-3.2-1b")
    p.add_argument("--input-len", type=int, default=230)
    p.add_argument("--output-len", type=int, default=120)
    p.add_argument("--batch-sizes", default="1,3,64")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import torch
    import transformers

    cfg_dict = load_shape(args.shape)
    cfg = transformers.AutoConfig.for_model(**{k: v for k, v in cfg_dict.items() if k not in ("architectures", "transformers_version")})
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(args.device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    load_s = time.perf_counter() - t0
    vocab = cfg.vocab_size
    results = {"shape": args.shape, "transformers": transformers.__version__, "torch": torch.__version__, "load_s": load_s,
               "input_len": args.input_len, "output_len": args.output_len, "runs": []}

    def gen(batch: int, new: int) -> float:
        ids = torch.randint(10, vocab - 10, (batch, args.input_len), device=args.device)
        mask = torch.ones_like(ids)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        assert out.shape[1] == args.input_len + new
        return time.perf_counter() - t

    gen(1, 4)  # warm-up
    for b in [int(x) for x in args.batch_sizes.split(",") if x]:
        t_prefill = gen(b, 1)  # prefill + one token
        t_all = gen(b, args.output_len)
        step_ms = (t_all - t_prefill) / max(1, args.output_len - 1) * 1e3
        r = {"batch": b, "seconds": t_all, "prefill_s": t_prefill, "decode_step_ms": step_ms,
             "output_tok_s": b * args.output_len / t_all, "req_s": b / t_all}
        results["runs"].append(r)
        print(f"HF generate batch {b:4d}: {t_all:.2f} s, decode step {step_ms:.2f} ms, {r['output_tok_s']:.0f} output tok/s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
