"""``l2d-jax bench serve``: statistics on hand-made timings, the client loop against a fake
OpenAI-compatible server, and one end-to-end run against a real in-process server."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest
from fastapi import FastAPI, Request  # module level: the routes' annotations are resolved here
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter as PromCounter, generate_latest

from l2d_jax import bench_serve as bs
from l2d_jax.errors import UsageError
from l2d_jax.serving.server import serve_in_thread


def _t(client=0, steps=0, start=0.0, first=0.5, last=2.5, end=3.0, tokens=5, error=None):
    return bs.RequestTiming(client, steps, start, first, last, end, tokens, "length", error)


def test_request_rates():
    t = _t()
    assert t.ttft == 0.5
    assert t.decode_rate == 2.0  # (5 - 1) tokens / 2 s
    assert t.total_rate == pytest.approx(5 / 3)
    assert _t(tokens=1).decode_rate is None
    assert _t(first=None, last=None).ttft is None


def test_percentile():
    assert bs.percentile([4, 1, 3, 2], 50) == 2.5
    assert bs.percentile([1, 2, 3, 4], 99) == pytest.approx(3.97)  # 3 + 0.97 * (4 - 3)
    assert bs.percentile([], 50) is None


def test_parse_mixes_and_client_steps():
    assert bs.parse_mixes("0;4;8;0/4/8") == ((0,), (4,), (8,), (0, 4, 8))
    for bad in ("", "0;x", "1", "0/-2"):
        with pytest.raises(UsageError):
            bs.parse_mixes(bad)
    assert bs.client_steps(5, (0, 4, 8)) == [0, 4, 8, 0, 4]


def test_summarize_point():
    timings = [_t(0, 0, tokens=5), _t(1, 4, first=1.0, last=2.0, tokens=3), _t(2, 8, tokens=9, end=4.0),
               _t(3, 0, first=0.1, last=0.9, tokens=3, end=1.0), _t(4, 4, error="APIError: boom")]
    p = bs.summarize_point(5, (0, 4, 8), timings, wall_s=4.0)
    assert p["completion_tokens"] == 20 and p["aggregate_tokens_per_s"] == 5.0
    assert p["requests"] == 4 and p["errors"] == ["APIError: boom"] and p["finish_reasons"] == {"length": 4}
    assert p["decode_tokens_per_s"] == pytest.approx((2 + 2 + 4 + 2.5) / 4)
    assert p["ttft_p50_s"] == 0.5 and p["ttft_p99_s"] == pytest.approx(0.985)  # of 0.1, 0.5, 0.5, 1.0
    assert p["groups"]["0"]["requests"] == 2 and p["groups"]["0"]["decode_tokens_per_s"] == 2.25
    assert p["groups"]["4"]["requests"] == 1 and p["groups"]["4"]["decode_tokens_per_s"] == 2.0
    assert p["groups"]["8"]["tokens_per_s"] == 2.25  # 9 tokens / 4 s
    assert len(p["request_log"]) == 5 and p["request_log"][4]["error"] == "APIError: boom"


def _point(c, mix, aggregate, decode):
    groups = {str(s): {"requests": int(s in decode), "decode_tokens_per_s": decode.get(s),
                       "tokens_per_s": decode.get(s) and decode[s] / 2} for s in sorted(set(mix))}
    return {"concurrency": c, "mix": list(mix), "aggregate_tokens_per_s": aggregate,
            "decode_tokens_per_s": decode[mix[0]], "groups": groups}


def test_summarize_must_shows():
    points = [_point(1, (0,), 10.0, {0: 11.0}), _point(8, (0,), 45.0, {0: 6.0}),
              _point(8, (4,), 9.0, {4: 2.0}), _point(8, (0, 4), 20.0, {0: 4.0, 4: 3.0}),
              _point(1, (0, 4), 10.0, {0: 30.0})]
    s = bs.summarize(points)
    assert s["single_tokens_per_s"] == 10.0 and s["single_decode_tokens_per_s"] == 11.0
    assert s["aggregate_over_single"] == {"1": 1.0, "8": 4.5}
    assert s["aggregate_over_single_c8"] == 4.5 and s["meets_scaling_target"] is True
    mix = s["mix_over_alone"]["0/4"]
    assert mix["8"]["0"] == {"mix": 4.0, "alone": 6.0, "ratio": pytest.approx(2 / 3),
                             "ratio_total": pytest.approx(2 / 3)}
    assert mix["8"]["4"]["ratio"] == 1.5
    assert set(mix) == {"8"}  # C=1: client 0 only, not a mix
    assert s["mix_within_2x"] is True
    points[3]["groups"]["4"]["decode_tokens_per_s"] = 0.9  # 0.45x of alone
    assert bs.summarize(points)["mix_within_2x"] is False
    empty = bs.summarize([_point(4, (4,), 9.0, {4: 2.0})])
    assert empty["single_tokens_per_s"] is None and empty["meets_scaling_target"] is None
    assert empty["mix_within_2x"] is None


def test_metrics_delta():
    before = {"l2d_nfe_total": 10.0, "l2d_slots": 8.0, 'l2d_http_requests_total{route="/metrics",status="200"}': 1.0}
    after = {"l2d_nfe_total": 25.0, "l2d_slots": 8.0, 'l2d_http_requests_total{route="/metrics",status="200"}': 2.0,
             "l2d_ttft_seconds_count": 3.0}
    assert bs.metrics_delta(before, after) == {"l2d_nfe_total": 15.0, "l2d_ttft_seconds_count": 3.0,
                                               'l2d_http_requests_total{route="/metrics",status="200"}': 1.0}
    assert bs.metrics_delta(None, after) is None


def _fake_app(seen: list[int]):
    """Streams ``max_tokens`` chunks (at most 5) with usage; counts them in /metrics."""
    registry = CollectorRegistry()
    generated = PromCounter("fake_generated_tokens", "tokens", registry=registry)
    app = FastAPI()

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "fake", "object": "model", "created": 0, "owned_by": "t"}]}

    @app.get("/metrics")
    def metrics():
        return Response(generate_latest(registry), media_type="text/plain")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen.append(body["ode_steps"])
        n = min(5, body["max_tokens"])
        base = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "fake"}

        async def events():
            for i in range(n):
                await asyncio.sleep(0.002)
                generated.inc()
                choice = {"index": 0, "delta": {"content": f" w{i}"}, "finish_reason": "length" if i == n - 1 else None}
                yield f"data: {json.dumps({**base, 'choices': [choice]})}\n\n"
            usage = {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": n + 3}
            yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def test_bench_against_fake_server(tmp_path):
    pytest.importorskip("openai")
    seen: list[int] = []
    with serve_in_thread(_fake_app(seen)) as url:
        report = bs.bench_serve(url, concurrency=(1, 3), mixes=((0,), (4,), (0, 4)), max_tokens=5,
                                requests_per_client=2)
    assert report["served_model"] == "fake" and len(report["points"]) == 6
    # per point: one warm-up request per client, then 2 timed ones per client
    assert Counter(seen) == {0: (1 + 3 + 1 + 2) * 3, 4: (1 + 3 + 1) * 3}
    for p in report["points"]:
        c = p["concurrency"]
        assert p["requests"] == 2 * c and p["completion_tokens"] == 10 * c and not p["errors"]
        assert p["metrics_delta"]["fake_generated_tokens_total"] == (bs.WARMUP_TOKENS + 10) * c
        assert p["finish_reasons"] == {"length": 2 * c} and p["decode_tokens_per_s"] > 0
    mixed = next(p for p in report["points"] if p["concurrency"] == 3 and p["label"] == "0/4")
    assert {s: g["requests"] for s, g in mixed["groups"].items()} == {"0": 4, "4": 2}
    assert set(report["summary"]["mix_over_alone"]["0/4"]) == {"3"}
    assert bs.plot_serve(report, tmp_path / "serve.png").stat().st_size > 0


def test_seconds_mode_against_fake_server():
    pytest.importorskip("openai")
    with serve_in_thread(_fake_app([])) as url:
        timings, wall = asyncio.run(bs.run_point(url, "fake", 2, (0,), max_tokens=3, seconds=0.2))
    assert wall >= 0.2 and len(timings) >= 2 and all(t.tokens == 3 for t in timings)


@pytest.mark.slow
def test_bench_serve_end_to_end(tmp_path, monkeypatch):
    """The CLI against a real in-process server (engine + api) on a tiny L2D model."""
    pytest.importorskip("openai")
    for part in ("engine", "api", "server"):
        pytest.importorskip(f"l2d_jax.serving.{part}", reason=f"needs l2d_jax/serving/{part}.py")
    import jax_tiny
    import tiny_models

    from l2d_jax import cli
    from l2d_jax.serving import server

    tok = tiny_models.tiny_tokenizer()
    model = jax_tiny.tiny_l2d(vocab_size=tiny_models.VOCAB)
    monkeypatch.setattr(server, "load_served_model", lambda spec: (model, tok, "tiny-l2d"))
    out = tmp_path / "serve.json"
    assert cli.main(["bench", "serve", "--concurrency", "1,2", "--mixes", "0;4;0/4", "--max-tokens", "8",
                     "--requests-per-client", "2", "--slots", "2", "--max-seq-len", "128",
                     "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    for key in ("date", "command", "machine", "model", "server", "served_model", "max_tokens", "prompts",
                "points", "summary"):
        assert key in report, key
    assert report["model"] == "tiny-l2d" and report["server"]["engine"]["slots"] == 2
    assert len(report["points"]) == 6
    for p in report["points"]:
        assert not p["errors"] and p["requests"] == 2 * p["concurrency"]
        for key in ("aggregate_tokens_per_s", "decode_tokens_per_s", "tokens_per_s", "ttft_p50_s", "ttft_p99_s",
                    "groups", "metrics_delta", "request_log"):
            assert key in p, key
        assert p["metrics_delta"]["l2d_generated_tokens_total"] >= p["completion_tokens"]
    s = report["summary"]
    for key in ("single_tokens_per_s", "aggregate_over_single", "aggregate_over_single_c8", "mix_over_alone",
                "mix_within_2x", "meets_scaling_target"):
        assert key in s, key
    assert s["single_tokens_per_s"] > 0 and set(s["mix_over_alone"]["0/4"]) == {"2"}  # C=1: client 0 only, not a mix
