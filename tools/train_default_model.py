#!/usr/bin/env python3
"""Train aiosched's embedded default model: a small Llama-architecture causal LM on the
Python standard library's own source, written in Hugging Face layout.

Three steps (each deterministic for a given interpreter and seed):

  prepare   (CPU, here)  collect the running interpreter's stdlib .py files, split them
            into train / held-out by a hash of the relative path, train a byte-level BPE
            tokenizer with `tokenizers` on the train split, pre-tokenize both splits into
            uint16 arrays, and write the tokenizer files + a held-out sample into the
            model dir.
  train     (GPU or CPU) train the model from those arrays with AdamW, a cosine schedule
            on a wall-clock budget, bf16 autocast and torch.compile on CUDA; write
            config.json, generation_config.json, model.safetensors (bf16) and a JSON log.
  select    pick the run with the lowest held-out loss among several `train` outputs and
            copy its files (the safetensors split into parts if large) to a folder.

    python tools/train_default_model.py prepare --data .train-data --model-dir aiosched/default_model
    python tools/train_default_model.py train --data .train-data --out /tmp/run --time-budget 420
    python tools/train_default_model.py select /tmp/runA /tmp/runB --out $OUT
    python tools/train_default_model.py install $OUT --model-dir aiosched/default_model

The model's tensors use HF's LlamaForCausalLM names and conventions (RMSNorm in float32,
rotate-half RoPE, SiLU-gated MLP, tied embeddings), so `from_pretrained` loads it as is;
`python tools/train_default_model.py check-hf` verifies that on random weights.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

EOT = "<|endoftext|>"
HELDOUT_PER_MILLE = 50  # 5% of files are held out
SAMPLE_CHARS = 6000

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '# ' + message['role'] + ':\\n' + message['content'] + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '# assistant:\\n' }}{% endif %}"
)


# ---------------------------------------------------------------------------- prepare

def stdlib_files() -> tuple[Path, list[tuple[str, str]]]:
    """(stdlib dir, [(relative posix path, text)]) for every UTF-8 .py file, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            try:
                text = p.read_bytes().decode("utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if text.strip():
                out.append((rel, text))
    out.sort()
    return root, out


def is_heldout(rel: str) -> bool:
    h = int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16)
    return h % 1000 < HELDOUT_PER_MILLE


def heldout_sample(val: list[tuple[str, str]]) -> tuple[str, str]:
    """The first ~SAMPLE_CHARS characters (whole lines) of the first held-out non-test module,
    in hash order, that is long enough."""
    def key(item: tuple[str, str]) -> str:
        return hashlib.sha256(item[0].encode()).hexdigest()

    for rel, text in sorted(val, key=key):
        if rel.startswith(("test/", "idlelib/idle_test/", "lib2to3/tests/")) or "/test" in rel:
            continue
        if len(text) < SAMPLE_CHARS * 2 or not text.isascii():
            continue
        cut = text.rfind("\n", 0, SAMPLE_CHARS) + 1
        return rel, text[:cut]
    raise RuntimeError("no held-out module long enough for the sample")


def build_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    eot = tok.token_to_id(EOT)
    assert eot == 0, eot
    # Like Llama: encode(text) (add_special_tokens=True) starts with the BOS token.
    tok.post_processor = processors.TemplateProcessing(single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B", special_tokens=[(EOT, eot)])
    return tok


def tokenizer_config(max_len: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "pad_token": EOT,
        "unk_token": None,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def cmd_prepare(args: argparse.Namespace) -> None:
    t0 = time.time()
    data, model_dir = Path(args.data), Path(args.model_dir)
    data.mkdir(parents=True, exist_ok=True)
    model_dir.mkdir(parents=True, exist_ok=True)
    root, files = stdlib_files()
    train = [(r, t) for r, t in files if not is_heldout(r)]
    val = [(r, t) for r, t in files if is_heldout(r)]
    print(f"stdlib {root}: {len(files)} files, {len(train)} train, {len(val)} held out", flush=True)

    tok = build_tokenizer([t for _, t in train], args.vocab_size)
    tok.save(str(data / "tokenizer.json"))
    t1 = time.time()
    print(f"tokenizer: vocab {tok.get_vocab_size()} in {t1 - t0:.0f} s", flush=True)

    def encode(split: list[tuple[str, str]]) -> np.ndarray:
        ids: list[int] = []
        for enc in tok.encode_batch([t for _, t in split], add_special_tokens=True):
            ids.extend(enc.ids)  # each file starts with <|endoftext|>
        arr = np.asarray(ids, dtype=np.uint16)
        assert int(arr.max()) < 65536
        return arr

    tr, va = encode(train), encode(val)
    np.save(data / "train.npy", tr)
    np.save(data / "val.npy", va)
    sample_path, sample = heldout_sample(val)
    train_bytes = sum(len(t.encode()) for _, t in train)
    val_bytes = sum(len(t.encode()) for _, t in val)
    meta = {
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "stdlib_dir": str(root),
        "files": len(files), "train_files": len(train), "heldout_files": len(val),
        "heldout_rule": f"int(sha256(relative path)[:8], 16) % 1000 < {HELDOUT_PER_MILLE}",
        "train_bytes": train_bytes, "heldout_bytes": val_bytes,
        "train_tokens": int(tr.size), "heldout_tokens": int(va.size),
        "bytes_per_token": round(train_bytes / tr.size, 3),
        "vocab_size": tok.get_vocab_size(),
        "heldout_sample_file": sample_path,
        "heldout_files_list": [r for r, _ in val],
        "train_sha256": hashlib.sha256(tr.tobytes()).hexdigest(),
        "prepare_seconds": round(time.time() - t0, 1),
    }
    (data / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    shutil.copy(data / "tokenizer.json", model_dir / "tokenizer.json")
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(args.max_len), indent=2) + "\n")
    (model_dir / "heldout_sample.txt").write_text(sample, encoding="utf-8")
    print(json.dumps({k: v for k, v in meta.items() if k != "heldout_files_list"}, indent=1), flush=True)


# ---------------------------------------------------------------------------- model

def build_model_classes():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class RMSNorm(nn.Module):
        def __init__(self, d: int, eps: float) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))
            self.eps = eps

        def forward(self, x):
            dt = x.dtype
            x = x.float()
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
            return self.weight * x.to(dt)

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    class Attention(nn.Module):
        def __init__(self, c: dict) -> None:
            super().__init__()
            d, hd = c["hidden_size"], c["head_dim"]
            self.nh, self.nkv, self.hd = c["num_attention_heads"], c["num_key_value_heads"], hd
            self.q_proj = nn.Linear(d, self.nh * hd, bias=False)
            self.k_proj = nn.Linear(d, self.nkv * hd, bias=False)
            self.v_proj = nn.Linear(d, self.nkv * hd, bias=False)
            self.o_proj = nn.Linear(self.nh * hd, d, bias=False)

        def forward(self, x, cos, sin):
            B, T, _ = x.shape
            q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)
            k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
            v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.nkv != self.nh)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))

    class MLP(nn.Module):
        def __init__(self, c: dict) -> None:
            super().__init__()
            d, f = c["hidden_size"], c["intermediate_size"]
            self.gate_proj = nn.Linear(d, f, bias=False)
            self.up_proj = nn.Linear(d, f, bias=False)
            self.down_proj = nn.Linear(f, d, bias=False)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    class Layer(nn.Module):
        def __init__(self, c: dict, dropout: float) -> None:
            super().__init__()
            self.self_attn = Attention(c)
            self.mlp = MLP(c)
            self.input_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
            self.post_attention_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
            self.drop = nn.Dropout(dropout)  # training only; HF Llama has no residual dropout

        def forward(self, x, cos, sin):
            x = x + self.drop(self.self_attn(self.input_layernorm(x), cos, sin))
            return x + self.drop(self.mlp(self.post_attention_layernorm(x)))

    class Inner(nn.Module):
        def __init__(self, c: dict, dropout: float) -> None:
            super().__init__()
            self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
            self.layers = nn.ModuleList(Layer(c, dropout) for _ in range(c["num_hidden_layers"]))
            self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])

    class LlamaLM(nn.Module):
        """Parameter names are exactly LlamaForCausalLM's (tied: no lm_head)."""

        def __init__(self, c: dict, dropout: float = 0.0) -> None:
            super().__init__()
            self.c = c
            self.model = Inner(c, dropout)
            hd = c["head_dim"]
            inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
            self.register_buffer("inv_freq", inv, persistent=False)

        def rope(self, T: int, device):
            pos = torch.arange(T, device=device, dtype=torch.float32)
            f = torch.outer(pos, self.inv_freq.to(device))
            emb = torch.cat((f, f), dim=-1)
            return emb.cos()[None, None], emb.sin()[None, None]

        def forward(self, idx, targets=None):
            x = self.model.embed_tokens(idx)
            cos, sin = self.rope(idx.shape[1], idx.device)
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
            for layer in self.model.layers:
                x = layer(x, cos, sin)
            x = self.model.norm(x)
            logits = F.linear(x, self.model.embed_tokens.weight)
            if targets is None:
                return logits
            return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))

    return LlamaLM


def model_config(args: argparse.Namespace, vocab_size: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": args.d_model,
        "intermediate_size": args.ffn,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.d_model // args.heads,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_len,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
    }


def init_weights(model, n_layers: int) -> None:
    import torch

    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            torch.nn.init.ones_(p)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            torch.nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layers))
        else:
            torch.nn.init.normal_(p, std=0.02)


# ---------------------------------------------------------------------------- train

def cmd_train(args: argparse.Namespace) -> None:
    import torch

    t_start = time.time()
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    dev = torch.device(args.device if args.device else ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    data = Path(args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = json.loads((data / "meta.json").read_text())
    train = torch.from_numpy(np.load(data / "train.npy").astype(np.int64)).to(dev)
    val = torch.from_numpy(np.load(data / "val.npy").astype(np.int64)).to(dev)
    cfg = model_config(args, meta["vocab_size"])
    LlamaLM = build_model_classes()
    model = LlamaLM(cfg, dropout=args.dropout).to(dev)
    init_weights(model, cfg["num_hidden_layers"])
    n_params = sum(p.numel() for p in model.parameters())
    log_path = out / f"train_log{args.tag}.json"
    log: dict = {"args": vars(args), "config": cfg, "params": n_params, "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
                 "torch": torch.__version__, "python_train": platform.python_version(), "corpus": {k: v for k, v in meta.items() if k != "heldout_files_list"},
                 "evals": []}
    print(f"params {n_params:,} on {log['device']}; train {train.numel():,} tokens, held-out {val.numel():,}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, **({"fused": True} if cuda else {}))
    gen = torch.Generator(device=dev)
    gen.manual_seed(args.seed)

    def batch(T: int, B: int):
        ix = torch.randint(0, train.numel() - T - 1, (B,), device=dev, generator=gen)
        off = torch.arange(T + 1, device=dev)
        w = train[ix[:, None] + off[None]]
        return w[:, :-1], w[:, 1:]

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    fwd = model
    compiled = False
    if cuda and args.compile:
        try:
            fwd = torch.compile(model, dynamic=False)
            compiled = True
        except Exception as e:  # noqa: BLE001
            print(f"torch.compile unavailable: {e!r}", flush=True)

    # Fixed held-out windows for the periodic estimate; the full held-out set at the end.
    eval_gen = torch.Generator(device="cpu").manual_seed(1234)
    n_eval = min(args.eval_windows, max(1, (val.numel() - 1) // args.seq))
    eval_ix = torch.randint(0, val.numel() - args.seq - 1, (n_eval,), generator=eval_gen).to(dev)

    @torch.no_grad()
    def eval_loss(windows_ix=None, T: int = args.seq, full: bool = False) -> float:
        model.eval()
        if full:
            n = (val.numel() - 1) // T
            starts = torch.arange(n, device=dev) * T
        else:
            starts = windows_ix
        tot, cnt = 0.0, 0
        for i in range(0, starts.numel(), args.eval_batch):
            s = starts[i:i + args.eval_batch]
            w = val[s[:, None] + torch.arange(T + 1, device=dev)[None]]
            with autocast():
                loss = model(w[:, :-1], w[:, 1:])
            tot += float(loss) * s.numel()
            cnt += s.numel()
        model.train()
        return tot / max(cnt, 1)

    def lr_at(step: int, frac: float) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = min(max(frac, 0.0), 1.0)
        return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))

    model.train()
    step, tokens = 0, 0
    best = (float("inf"), None, 0)
    t_train = None  # the schedule's clock starts once the first (compiling) step is done
    last_eval = 0.0
    budget = args.time_budget
    long_phase = False
    loss_acc, loss_n = 0.0, 0
    while True:
        now = time.time()
        frac = 0.0 if t_train is None else (now - t_train) / budget
        if frac >= 1.0 or (args.max_steps and step >= args.max_steps):
            break
        if args.hard_stop and now - t_start >= args.hard_stop:
            print(f"step {step}: hard stop at {now - t_start:.0f} s after start (schedule at {frac:.2f})", flush=True)
            log["hard_stopped_at_frac"] = round(frac, 3)
            break
        if args.long_seq and not long_phase and frac >= 1.0 - args.long_frac:
            long_phase = True
            print(f"step {step}: switching to sequence length {args.long_seq}", flush=True)
        T = args.long_seq if long_phase else args.seq
        B = args.batch * args.seq // T
        lr = lr_at(step, frac)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = batch(T, B)
        try:
            with autocast():
                loss = fwd(x, y)
            loss.backward()
        except Exception as e:  # noqa: BLE001
            if not compiled:
                raise
            print(f"torch.compile failed at run time, falling back to eager: {e!r}"[:2000], flush=True)
            opt.zero_grad(set_to_none=True)
            fwd, compiled = model, False
            continue
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += B * T
        loss_acc += float(loss.detach()) if step % 10 == 0 else 0.0
        loss_n += 1 if step % 10 == 0 else 0
        if t_train is None:
            if cuda:
                torch.cuda.synchronize()
            t_train = time.time()
            log["first_step_seconds"] = round(t_train - now, 1)
            log["compiled"] = compiled
            print(f"first step done in {t_train - now:.1f} s (compiled={compiled})", flush=True)
            last_eval = t_train
        if time.time() - last_eval >= args.eval_every or (args.max_steps and step == args.max_steps):
            vl = eval_loss(eval_ix)
            el = time.time() - t_train
            rec = {"step": step, "tokens": tokens, "elapsed": round(el, 1), "lr": lr, "train_loss": round(loss_acc / max(loss_n, 1), 4),
                   "heldout_loss_est": round(vl, 4), "seq": T, "tok_per_s": round(tokens / max(el, 1e-9))}
            loss_acc, loss_n = 0.0, 0
            log["evals"].append(rec)
            print(json.dumps(rec), flush=True)
            if vl < best[0]:
                best = (vl, {k: v.detach().clone() for k, v in model.state_dict().items()}, step)
            last_eval = time.time()

    train_seconds = time.time() - (t_train or time.time())
    final_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    results = {}
    for name, state in (("final", final_state), ("best", best[1])):
        if state is None:
            continue
        model.load_state_dict(state)
        results[name] = {"heldout_loss": round(eval_loss(full=True, T=args.seq), 4)}
        if args.long_seq:
            results[name][f"heldout_loss_seq{args.long_seq}"] = round(eval_loss(full=True, T=args.long_seq), 4)
    chosen = "final"
    if "best" in results and best[2] != step and results["best"]["heldout_loss"] < results["final"]["heldout_loss"]:
        chosen = "best"
    model.load_state_dict(final_state if chosen == "final" else best[1])
    log.update({"steps": step, "tokens_seen": tokens, "train_seconds": round(train_seconds, 1), "best_step": best[2],
                "results": results, "chosen": chosen, "heldout_loss": results[chosen]["heldout_loss"],
                "epochs": round(tokens / train.numel(), 2), "wall_seconds": round(time.time() - t_start, 1)})
    save_hf(model, cfg, out)
    log_path.write_text(json.dumps(log, indent=1) + "\n")
    print(json.dumps({k: log[k] for k in ("params", "steps", "tokens_seen", "epochs", "train_seconds", "results", "chosen")}), flush=True)


def save_hf(model, cfg: dict, out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    sd = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "pad_token_id": cfg["pad_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


# ---------------------------------------------------------------------------- select / install

PART = 15 * 1024 * 1024


def cmd_select(args: argparse.Namespace) -> None:
    runs = []
    for r in args.runs:
        logs = sorted(Path(r).glob("train_log*.json"))
        if not logs or not (Path(r) / "model.safetensors").is_file():
            print(f"{r}: no result", flush=True)
            continue
        runs.append((json.loads(logs[0].read_text())["heldout_loss"], Path(r), logs[0]))
    runs.sort(key=lambda t: t[0])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    merged = {}
    for loss, r, lg in runs:
        print(f"{r}: held-out loss {loss}", flush=True)
        merged[r.name] = json.loads(lg.read_text())
    (out / "runs.json").write_text(json.dumps(merged, indent=1) + "\n")
    loss, best, _ = runs[0]
    for f in ("config.json", "generation_config.json"):
        shutil.copy(best / f, out / f)
    blob = (best / "model.safetensors").read_bytes()
    for i in range(0, len(blob), PART):
        (out / f"model.safetensors.part{i // PART}").write_bytes(blob[i:i + PART])
    (out / "selected.txt").write_text(f"{best.name} {loss} sha256={hashlib.sha256(blob).hexdigest()}\n")
    print(f"selected {best} (held-out loss {loss})", flush=True)


def cmd_install(args: argparse.Namespace) -> None:
    src, dst = Path(args.src), Path(args.model_dir)
    parts = sorted(src.glob("model.safetensors.part*"), key=lambda p: int(p.name.rsplit("part", 1)[1]))
    blob = b"".join(p.read_bytes() for p in parts)
    sel = (src / "selected.txt").read_text().split()
    if sel[-1] != "sha256=" + hashlib.sha256(blob).hexdigest():
        raise SystemExit("model.safetensors parts do not match the recorded sha256")
    (dst / "model.safetensors").write_bytes(blob)
    for f in ("config.json", "generation_config.json"):
        shutil.copy(src / f, dst / f)
    print(f"installed {sel[0]} into {dst}", flush=True)


def cmd_check_hf(args: argparse.Namespace) -> None:
    """Our module on random weights == transformers' LlamaForCausalLM loaded from the saved dir."""
    import tempfile

    import torch
    import transformers

    ns = argparse.Namespace(d_model=128, ffn=256, layers=2, heads=2, kv_heads=2, max_len=256)
    cfg = model_config(ns, 300)
    LlamaLM = build_model_classes()
    torch.manual_seed(0)
    m = LlamaLM(cfg).eval()
    init_weights(m, 2)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    with tempfile.TemporaryDirectory() as d:
        save_hf(m, cfg, Path(d))
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
        m.load_state_dict({k: v.float() for k, v in hf.state_dict().items() if k != "lm_head.weight"})
        ids = torch.randint(0, 300, (2, 40))
        with torch.no_grad():
            a, b = m(ids), hf(ids).logits
        err = float((a - b).abs().max())
        print(f"max |ours - HF| = {err:.2e}")
        assert err < 1e-4, err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--data", default=".train-data")
    p.add_argument("--model-dir", default="aiosched/default_model")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--max-len", type=int, default=1024)
    p = sub.add_parser("train")
    p.add_argument("--data", default=".train-data")
    p.add_argument("--out", required=True)
    p.add_argument("--tag", default="")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--d-model", type=int, default=320)
    p.add_argument("--layers", type=int, default=7)
    p.add_argument("--heads", type=int, default=5)
    p.add_argument("--kv-heads", type=int, default=5)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--long-seq", type=int, default=1024, help="train the last --long-frac of the time at this length (0: never)")
    p.add_argument("--long-frac", type=float, default=0.15)
    p.add_argument("--batch", type=int, default=128, help="sequences per step at --seq (tokens per step stay the same at --long-seq)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.1)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--time-budget", type=float, default=420.0, help="seconds of training after the first step")
    p.add_argument("--max-steps", type=int, default=0)
    p.add_argument("--hard-stop", type=float, default=0.0, help="stop training this many seconds after the process started, whatever the schedule")
    p.add_argument("--eval-every", type=float, default=20.0)
    p.add_argument("--eval-windows", type=int, default=256)
    p.add_argument("--eval-batch", type=int, default=64)
    p.add_argument("--compile", type=int, default=1)
    p = sub.add_parser("select")
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", required=True)
    p = sub.add_parser("install")
    p.add_argument("src")
    p.add_argument("--model-dir", default="aiosched/default_model")
    sub.add_parser("check-hf")
    args = ap.parse_args()
    {"prepare": cmd_prepare, "train": cmd_train, "select": cmd_select, "install": cmd_install, "check-hf": cmd_check_hf}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
