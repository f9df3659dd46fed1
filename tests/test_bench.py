"""`aiosched bench`: offline (fake and torch runners), --compare, JSON, serving mode, trace analysis."""
from __future__ import annotations

import argparse
import asyncio
import json
import math

import pytest

from aiosched import bench
from aiosched.cli import main as cli_main


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return p.parse_args(["--disable-tqdm", "--num-warmups", "1", *argv])


def check_metrics(m: dict, n: int, out_len: int | None = None) -> None:
    for k in bench.METRIC_KEYS:
        assert k in m, k
        assert isinstance(m[k], (int, float)) and math.isfinite(m[k]), (k, m[k])
    assert m["completed"] == n and m["failed"] == 0
    if out_len is not None:
        assert m["total_output_tokens"] == n * out_len
    assert m["request_throughput"] > 0 and m["output_throughput"] > 0
    assert m["total_token_throughput"] > m["output_throughput"]
    assert 0 < m["median_ttft_ms"] <= m["p99_ttft_ms"] + 1e-9
    assert m["mean_e2el_ms"] >= m["mean_ttft_ms"]


def test_workload_is_seeded_and_shares_prefix() -> None:
    a = bench.make_workload(8, 10, 4, 1000, seed=3, prefix_len=5)
    b = bench.make_workload(8, 10, 4, 1000, seed=3, prefix_len=5)
    assert a.prompts == b.prompts and a.seeds == b.seeds
    assert all(len(p) == 15 and p[:5] == a.prompts[0][:5] for p in a.prompts)
    assert len({tuple(p[5:]) for p in a.prompts}) == 8
    with pytest.raises(ValueError):
        bench.make_workload(0, 10, 4, 1000)


async def test_offline_fake_runner_metrics() -> None:
    args = parse("--runner", "fake", "--num-prompts", "24", "--input-len", "12", "--output-len", "8", "--ignore-eos",
                 "--max-concurrency", "6", "--num-kv-blocks", "256", "--block-size", "4")
    report = await bench.run_bench(args)
    assert list(report["runs"]) == ["async"]
    m = report["runs"]["async"]
    check_metrics(m, 24, 8)
    assert m["total_input_tokens"] == 24 * 12
    e = m["engine"]
    assert e["steps"] > 0 and e["mean_step_ms"] > 0
    assert 0 <= e["scheduler_share"] <= 1 and 0 <= e["wait_share"] <= 1
    assert e["runner"] == "fake" and e["async_scheduling"] is True


async def test_compare_sync_async_writes_json(tmp_path) -> None:
    path = tmp_path / "out" / "bench.json"
    rc = await asyncio.to_thread(cli_main, ["bench", "--runner", "fake", "--num-prompts", "16", "--input-len", "9", "--output-len", "6",
                                            "--ignore-eos", "--prefix-len", "8", "--compare", "sync,async", "--json", str(path),
                                            "--disable-tqdm", "--num-kv-blocks", "256", "--block-size", "4"])
    assert rc == 0
    report = json.loads(path.read_text())
    assert list(report["runs"]) == ["sync", "async"]
    for mode in ("sync", "async"):
        check_metrics(report["runs"][mode], 16, 6)
        assert report["runs"][mode]["engine"]["async_scheduling"] is (mode == "async")
        assert report["runs"][mode]["total_input_tokens"] == 16 * 17
    assert report["ratios_of"] == "async/sync"
    for k in ("request_throughput", "output_throughput", "mean_tpot_ms", "mean_step_ms"):
        assert report["ratios"][k] > 0
    assert report["workload"]["prefix_len"] == 8


async def test_poisson_arrivals_spread_requests() -> None:
    args = parse("--runner", "fake", "--num-prompts", "10", "--input-len", "4", "--output-len", "2", "--request-rate", "100")
    report = await bench.run_bench(args)
    m = report["runs"]["async"]
    check_metrics(m, 10)
    assert m["duration_s"] > 0.02  # 9 exponential gaps with mean 10 ms


def test_bad_compare_mode_is_rejected() -> None:
    assert cli_main(["bench", "--runner", "fake", "--compare", "sync,fast", "--disable-tqdm"]) == 2


def test_trace_idle_analysis(tmp_path) -> None:
    ev = [{"ph": "X", "cat": "kernel", "ts": 0, "dur": 10}, {"ph": "X", "cat": "kernel", "ts": 5, "dur": 10},  # overlap: busy 0..15
          {"ph": "X", "cat": "kernel", "ts": 17, "dur": 3},  # 2 us gap
          {"ph": "X", "cat": "gpu_memcpy", "ts": 70, "dur": 30},  # 50 us gap
          {"ph": "X", "cat": "cpu_op", "ts": 0, "dur": 500}]  # host events are ignored
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"traceEvents": ev}))
    r = bench.trace_idle_analysis(str(p))
    assert r["span_us"] == 100 and r["busy_us"] == 48 and r["idle_us"] == 52
    assert r["idle_share"] == pytest.approx(0.52)
    assert r["long_gaps"] == 1 and r["long_gap_idle_share"] == pytest.approx(0.5)
    p.write_text(json.dumps({"traceEvents": ev[-1:]}))
    assert bench.trace_idle_analysis(str(p))["idle_share"] is None


# ---- serving mode against a minimal OpenAI-style streaming server


async def _fake_openai_server(received: list[dict]) -> tuple[asyncio.AbstractServer, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                method, path, _ = lines[0].split(" ")
                headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if path == "/v1/models":
                    data = json.dumps({"object": "list", "data": [{"id": "fake-model", "object": "model"}]}).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(data) + data)
                    await writer.drain()
                    continue
                req = json.loads(body)
                received.append(req)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")

                def chunk(obj: object) -> bytes:
                    payload = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
                    return b"%x\r\n%s\r\n" % (len(payload), payload)

                for i in range(req["max_tokens"]):
                    await asyncio.sleep(0.001)
                    writer.write(chunk({"id": "c", "object": "text_completion", "model": req["model"],
                                        "choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]}))
                    await writer.drain()
                writer.write(chunk({"id": "c", "choices": [], "usage": {"prompt_tokens": len(req["prompt"]), "completion_tokens": req["max_tokens"]}}))
                writer.write(chunk(b"[DONE]") + b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_serving_mode_streams_token_id_prompts(tmp_path) -> None:
    received: list[dict] = []
    server, port = await _fake_openai_server(received)
    try:
        args = parse("--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "12", "--input-len", "7", "--output-len", "5",
                     "--max-concurrency", "4", "--ignore-eos", "--vocab-size", "100")
        report = await bench.run_bench(args)
    finally:
        server.close()
        await server.wait_closed()
    m = report["runs"]["serving"]
    check_metrics(m, 12, 5)
    assert m["mean_itl_ms"] > 0.5  # the server sleeps 1 ms between tokens
    timed = received[1:]  # the first was the warm-up
    assert len(timed) == 12
    for r in timed:
        assert r["model"] == "fake-model" and r["stream"] is True and r["ignore_eos"] is True
        assert isinstance(r["prompt"], list) and len(r["prompt"]) == 7 and all(0 <= t < 100 for t in r["prompt"])
    bench.write_json(report, str(tmp_path / "s.json"))
    assert json.loads((tmp_path / "s.json").read_text())["mode"] == "serving"


async def test_serving_mode_counts_http_errors() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\nconnection: close\r\n\r\nbusy")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        args = parse("--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "3", "--input-len", "4", "--output-len", "2",
                     "--served-model-name", "m", "--num-warmups", "0")
        report = await bench.run_bench(args)
    finally:
        server.close()
        await server.wait_closed()
    m = report["runs"]["serving"]
    assert m["completed"] == 0 and m["failed"] == 3
    assert any("503" in e for e in m["errors"])


# ---- the torch runner on a tiny model (once it exists)


def _tiny_config(tmp_path) -> str:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
           "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
           "head_dim": 16, "torch_dtype": "float32"}
    p = tmp_path / "tiny.json"
    p.write_text(json.dumps(cfg))
    return str(p)


async def test_offline_torch_runner_random_weights(tmp_path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("aiosched.executors.torch.runner")
    if "load_format" not in {f for f in bench.EngineConfig.__struct_fields__}:
        pytest.skip("EngineConfig has no load_format yet")
    args = parse("--random-weights", _tiny_config(tmp_path), "--num-prompts", "6", "--input-len", "10", "--output-len", "5",
                 "--ignore-eos", "--compare", "sync,async", "--num-kv-blocks", "64", "--block-size", "16", "--device", "cpu",
                 "--profile", str(tmp_path / "prof"), "--profile-start-step", "1", "--profile-steps", "2")
    report = await bench.run_bench(args)
    for mode in ("sync", "async"):
        check_metrics(report["runs"][mode], 6, 5)
        assert report["runs"][mode]["engine"]["runner"] == "torch"
        prof = report["runs"][mode]["profile"]
        assert prof["traced_steps"] >= 2 and (tmp_path / "prof" / f"trace_profile_{mode}.json").is_file()


# ---- against the real aiosched server: API key, the chat endpoint, dataset files, vocabulary


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from tests.tiny_model import _write_tokenizer_only

    d = tmp_path_factory.mktemp("bench-tok")
    _write_tokenizer_only(d, max_model_len=256)
    return d


@pytest.fixture(scope="module")
def keyed_server(tok_dir):
    from aiosched.server import build_app
    from tests.server_thread import ServerThread

    app = build_app({"runner": "fake", "model": str(tok_dir), "num_kv_blocks": 256, "block_size": 4, "max_num_batched_tokens": 128},
                    api_key="bench-key", served_model_name="m")
    with ServerThread(app) as s:
        yield s


def _jsonl(tmp_path, prompts: list[str], output_len: int | None = None):
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(json.dumps({"prompt": t, **({"output_len": output_len} if output_len else {})}) + "\n" for t in prompts))
    return str(p)


async def test_chat_backend_with_api_key_from_the_environment(keyed_server, tok_dir, tmp_path, monkeypatch) -> None:
    path = _jsonl(tmp_path, [f"question {i}?" for i in range(5)], output_len=4)
    argv = ["--base-url", keyed_server.url, "--backend", "openai-chat", "--dataset", "jsonl", "--dataset-path", path,
            "--num-prompts", "5", "--ignore-eos", "--max-concurrency", "2"]
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    denied = (await bench.run_bench(parse(*argv)))["runs"]["serving"]
    assert denied["completed"] == 0 and any("401" in e for e in denied["errors"])
    monkeypatch.setenv("OPENAI_API_KEY", "bench-key")
    report = await bench.run_bench(parse(*argv))
    assert report["endpoint"] == "/v1/chat/completions"
    m = report["runs"]["serving"]
    check_metrics(m, 5, 4)
    assert m["total_input_tokens"] > 5  # prompt_tokens from the server's usage (the chat template adds some)
    # --api-key wins over the environment; the completions endpoint with token-id prompts
    monkeypatch.setenv("OPENAI_API_KEY", "wrong")
    report = await bench.run_bench(parse("--base-url", keyed_server.url, "--api-key", "bench-key", "--num-prompts", "3", "--input-len", "6",
                                         "--output-len", "3", "--ignore-eos", "--tokenizer", str(tok_dir)))
    check_metrics(report["runs"]["serving"], 3, 3)
    assert report["runs"]["serving"]["total_input_tokens"] == 18


async def test_chat_endpoint_random_prompts_need_a_tokenizer(keyed_server, tok_dir) -> None:
    with pytest.raises(ValueError, match="tokenizer: the chat endpoint takes text"):
        await bench.run_bench(parse("--base-url", keyed_server.url, "--endpoint", "/v1/chat/completions", "--num-prompts", "2"))
    report = await bench.run_bench(parse("--base-url", keyed_server.url, "--endpoint", "/v1/chat/completions", "--api-key", "bench-key",
                                         "--tokenizer", str(tok_dir), "--num-prompts", "3", "--input-len", "8", "--output-len", "3",
                                         "--ignore-eos"))
    check_metrics(report["runs"]["serving"], 3, 3)
    with pytest.raises(ValueError, match="endpoint: --backend openai-chat needs a chat"):
        await bench.run_bench(parse("--base-url", keyed_server.url, "--backend", "openai-chat", "--endpoint", "/v1/completions"))


async def test_offline_sharegpt_dataset(tok_dir, tmp_path) -> None:
    from aiosched.tokenizer import Tokenizer

    tok = Tokenizer(tok_dir)
    convs = [{"conversations": [{"from": "human", "value": f"Write function {i}"}, {"from": "gpt", "value": "def f(x):\n    return x" * (i + 1)}]}
             for i in range(4)]
    convs.insert(1, {"conversations": [{"from": "gpt", "value": "starts with the model: skipped"}]})
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(convs))
    args = parse("--runner", "fake", "--model", str(tok_dir), "--dataset", "sharegpt", "--dataset-path", str(path), "--num-prompts", "3",
                 "--ignore-eos", "--num-kv-blocks", "256", "--block-size", "4")
    report = await bench.run_bench(args)
    m = report["runs"]["async"]
    want_out = [len(tok.encode(c["conversations"][1]["value"], add_special_tokens=False)) for c in (convs[0], convs[2], convs[3])]
    want_in = [len(tok.encode(c["conversations"][0]["value"])) for c in (convs[0], convs[2], convs[3])]
    check_metrics(m, 3)
    assert m["total_output_tokens"] == sum(want_out) and m["total_input_tokens"] == sum(want_in)


def test_dataset_file_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="dataset-path: --dataset jsonl needs a local file"):
        bench.load_dataset("jsonl", None, 4, 8, 0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"nope": 1}\n')
    with pytest.raises(ValueError, match="line 2 has no 'prompt'"):
        bench.load_dataset("jsonl", str(bad), 4, 8, 0)
    w = bench.load_dataset("jsonl", _jsonl(tmp_path, ["a", "b", "c"]), 2, 8, 0)
    assert w.prompts == ["a", "b"] and [w.max_tokens(i) for i in range(2)] == [8, 8]


def test_random_prompts_come_from_the_models_own_vocabulary(tok_dir) -> None:
    from aiosched.tokenizer import Tokenizer

    tok = Tokenizer(tok_dir)
    vocab = bench.tokenizer_vocab(tok)
    specials = {tok._tok.token_to_id(t) for t in ("<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>")}
    assert specials and not specials & set(vocab)
    assert len(vocab) == tok.vocab_size - len(specials)
    args = parse("--num-prompts", "20", "--input-len", "30")
    w = bench.build_workload(args, tok, tok.vocab_size)
    ids = {t for p in w.prompts for t in p}
    assert ids <= set(vocab) and len(ids) > 100
    w2 = bench.build_workload(parse("--num-prompts", "20", "--input-len", "30", "--vocab-size", "50"), tok, tok.vocab_size)
    assert max(t for p in w2.prompts for t in p) < 50  # --vocab-size still wins


async def test_missing_httpx_is_a_clear_error(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "httpx", None)
    monkeypatch.setitem(sys.modules, "httpx2", None)
    with pytest.raises(ValueError, match=r"needs httpx: pip install 'aiosched\[bench\]'"):
        await bench.run_bench(parse("--base-url", "http://127.0.0.1:9", "--num-prompts", "1"))


def test_triton_cache_entries_count_compiled_kernels(tmp_path, monkeypatch) -> None:
    """The bench's count of kernels compiled during a run: one directory per kernel in Triton's cache."""
    from aiosched.bench import _triton_cache_entries

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    assert _triton_cache_entries() == 0  # no cache yet
    for name in ("a1", "b2"):
        (tmp_path / "cache" / name).mkdir(parents=True)
    (tmp_path / "cache" / "lock").write_text("")  # files are not kernels
    assert _triton_cache_entries() == 2
