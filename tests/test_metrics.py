"""Prometheus metrics on /metrics: a model_name label on every aiosched series, the
histograms dashboards are built from, process_* collectors, and 4xx/5xx counters."""
from __future__ import annotations

import random
import httpx
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from aiosched.metrics import _BulkHistogram, _token_buckets
from aiosched.server import build_app
from tests.server_thread import ServerThread
from tests.tiny_model import _write_tokenizer_only

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("metrics-model")
    _write_tokenizer_only(d, max_model_len=256)
    app = build_app({"runner": "fake", "model": str(d), "num_kv_blocks": 64, "block_size": 4, "max_num_batched_tokens": 64},
                    served_model_name="served-m")
    with ServerThread(app) as s:
        yield s


def samples(s: ServerThread) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(s.url + "/metrics").text
    out = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            out[(smp.name, tuple(sorted(smp.labels.items())))] = smp.value
    return out


def value(data: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted({"model_name": "served-m", **labels}.items())))
    assert key in data, (name, labels, sorted(k for k in data if k[0] == name))
    return data[key]


def complete(s: ServerThread, prompt: list[int], stream: bool) -> httpx.Response:
    return httpx.post(s.url + "/v1/completions", timeout=60, json={"model": "served-m", "prompt": prompt, "max_tokens": MAX_TOKENS,
                                                                  "ignore_eos": True, "temperature": 0, "stream": stream})


def test_request_histograms_and_model_name(srv: ServerThread) -> None:
    before = samples(srv)
    assert complete(srv, [5, 6, 7], stream=False).status_code == 200
    assert complete(srv, [5, 6, 7, 8, 9], stream=True).status_code == 200
    after = samples(srv)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted({"model_name": "served-m", **labels}.items())))
        return after[key] - before.get(key, 0.0)

    for hist in ("aiosched_request_queue_time_seconds", "aiosched_request_prefill_time_seconds", "aiosched_request_decode_time_seconds",
                 "aiosched_time_to_first_token_seconds", "aiosched_time_per_output_token_seconds", "aiosched_e2e_request_latency_seconds",
                 "aiosched_request_prompt_tokens", "aiosched_request_generation_tokens"):
        assert delta(hist + "_count") == 2, hist
        assert delta(hist + "_bucket", le="+Inf") == 2, hist
    # One inter-token gap per output after a sample's first (one token per step here).
    assert delta("aiosched_inter_token_latency_seconds_count") == 2 * (MAX_TOKENS - 1)
    assert delta("aiosched_request_prompt_tokens_sum") == 3 + 5
    assert delta("aiosched_request_generation_tokens_sum") == 2 * MAX_TOKENS
    assert delta("aiosched_request_generation_tokens_bucket", le="5.0") == 0
    assert delta("aiosched_request_generation_tokens_bucket", le="10.0") == 2
    assert delta("aiosched_requests_total", finish_reason="length") == 2
    assert delta("aiosched_generation_tokens_total") == 2 * MAX_TOKENS
    # Every aiosched series names the model.
    names = {name for name, labels in after if name.startswith("aiosched_")}
    assert len(names) > 30
    assert all(dict(labels).get("model_name") == "served-m" for name, labels in after if name.startswith("aiosched_"))


def test_process_collectors(srv: ServerThread) -> None:
    data = samples(srv)
    names = {name for name, _ in data}
    assert "process_resident_memory_bytes" in names and "process_cpu_seconds_total" in names
    assert "python_info" in names and "python_gc_objects_collected_total" in names


def test_4xx_and_5xx_counters(srv: ServerThread) -> None:
    before = samples(srv)
    assert value(before, "aiosched_http_requests_failed_total", status_class="5xx") >= 0  # exported before any error
    r = httpx.post(srv.url + "/v1/completions", json={"model": "served-m", "prompt": "x", "top_p": 0})
    assert r.status_code == 400
    r = httpx.post(srv.url + "/v1/completions", json={"model": "other", "prompt": "x"})
    assert r.status_code == 404
    after = samples(srv)
    cls = lambda d, c: value(d, "aiosched_http_requests_failed_total", status_class=c)  # noqa: E731
    assert cls(after, "4xx") - cls(before, "4xx") == 2
    assert cls(after, "5xx") == cls(before, "5xx")
    assert value(after, "aiosched_http_errors_total", status="404") >= 1


def test_bulk_histogram_equals_prometheus_histogram() -> None:
    """Binning later, in bulk, gives what observing each value gives (bounds inclusive)."""
    rng = random.Random(0)
    bounds = (0.01, 0.1, 1.0, 10.0)
    values = [rng.choice([0.01, 0.1, 1.0, 10.0, 11.0]) if i % 3 == 0 else rng.uniform(0, 12) for i in range(10_000)]
    reg = CollectorRegistry()
    ref = Histogram("h", "doc", ["model_name"], buckets=bounds, registry=reg).labels("m")
    bulk = _BulkHistogram("h", "doc", bounds, "m")
    for v in values:
        ref.observe(v)
        bulk.add(v)
    want = {(s.name, s.labels.get("le")): s.value for f in text_string_to_metric_families(generate_latest(reg).decode()) for s in f.samples
            if s.name in ("h_bucket", "h_count")}
    fam = bulk.family()
    got = {(s.name, s.labels.get("le")): s.value for s in fam.samples if s.name in ("h_bucket", "h_count")}
    assert got == want
    assert next(s.value for s in fam.samples if s.name == "h_sum") == pytest.approx(sum(values))


def test_token_buckets_cover_the_context() -> None:
    assert _token_buckets(1024) == (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
    assert _token_buckets(1) == (1,)

