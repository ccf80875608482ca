"""`apb serve` as a user runs it: a real server process on localhost (embedded model, one CPU host) and a real
HTTP client: health, models, plain and streamed completions, the document cache, bad requests, the API key,
and SIGTERM (exit 0 within 10 s, no process left)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parents[1]
DOCUMENT = (ROOT / "examples" / "sample.md").read_text()
QUESTION = "What is the secret passcode for the north archive?"
KEY = "test-key"
START_S = 120  # a fresh machine converts the embedded GGUF first (~20 s), then loads


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    try:
        from apb_core import models

        models.resolve_model(None)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"embedded model not installed: {exc}")
    port = _free_port()
    cmd = [sys.executable, "-m", "apb_cli.main", "serve", "--port", str(port), "--device", "cpu", "--hosts", "1",
           "--api-key", KEY]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_S
        while True:
            assert proc.poll() is None, f"server exited: {proc.stderr.read()}"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server not ready in time"
            time.sleep(0.5)
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=300)
        yield proc, client
        client.close()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _chat(question: str, document: str = DOCUMENT, **extra) -> dict:
    return {"messages": [{"role": "system", "content": document}, {"role": "user", "content": question}], **extra}


def test_health_and_models(server):
    _, client = server
    health = client.get("/health").json()
    assert health["status"] == "ready"
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == health["model"]


def test_completion_then_cached_question_is_faster(server):
    _, client = server
    t0 = time.perf_counter()
    first = client.post("/v1/chat/completions", json=_chat(QUESTION, max_tokens=16))
    miss_s = time.perf_counter() - t0
    assert first.status_code == 200, first.text
    body = first.json()
    assert "7481" in body["choices"][0]["message"]["content"]
    assert body["object"] == "chat.completion" and body["usage"]["prompt_tokens"] > 3000
    t0 = time.perf_counter()
    second = client.post("/v1/chat/completions", json=_chat("Who keeps the north archive?", max_tokens=16))
    hit_s = time.perf_counter() - t0
    assert second.status_code == 200, second.text
    assert second.json()["apb"]["cache_hit"] is True
    assert second.json()["apb"]["result"]["timings"]["prefill_s"] == 0.0
    print(f"cache miss {miss_s:.2f} s, hit {hit_s:.2f} s, ratio {miss_s / hit_s:.1f}x")
    assert miss_s >= 2 * hit_s


def test_streamed_completion(server):
    _, client = server
    chunks = []
    with client.stream("POST", "/v1/chat/completions", json=_chat(QUESTION, stream=True, max_tokens=24)) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[len("data: "):])
    assert chunks[-1] == "[DONE]"
    events = [json.loads(c) for c in chunks[:-1]]
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert "7481" in text


def test_bad_requests_are_400(server):
    _, client = server
    bad_json = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()["error"]["type"] == "invalid_request_error"
    missing = client.post("/v1/chat/completions", json={"model": "x"})
    assert missing.status_code == 400 and "messages" in missing.json()["error"]["message"]
    wrong_type = client.post("/v1/chat/completions", json=_chat(QUESTION, max_tokens="many"))
    assert wrong_type.status_code == 400
    not_user = client.post("/v1/chat/completions", json={"messages": [{"role": "assistant", "content": "hi"}]})
    assert not_user.status_code == 400 and "user" in not_user.json()["error"]["message"]
    long = client.post("/v1/chat/completions", json=_chat(QUESTION, document="lorem ipsum dolor " * 4000))
    assert long.status_code == 400
    message = long.json()["error"]["message"]
    assert "window is 8192" in message and "needs" in message, message


def test_api_key_required(server):
    proc, client = server
    url = str(client.base_url)
    assert httpx.get(f"{url}/v1/models").status_code == 401
    wrong = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"


def test_ask_with_server_prints_the_same_json(server):
    _, client = server
    cmd = [sys.executable, "-m", "apb_cli.main", "ask", "examples/sample.md", QUESTION, "--server", str(client.base_url),
           "--api-key", KEY, "--json", "--max-new-tokens", "16", "--hosts", "1", "--device", "cpu"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert "7481" in payload["answer"] and payload["method"] == "full" and payload["prompt_tokens"] > 3000
    assert {"timings", "context_tokens", "generated_tokens", "finish_reason", "notes", "warnings"} <= set(payload)
    wrong = subprocess.run([*cmd[:-7], "--api-key", "nope"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and "401" in wrong.stderr and wrong.stdout == ""


def test_sigterm_exits_cleanly(server):
    proc, client = server
    assert client.get("/health").status_code == 200
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=10)
    assert code == 0, proc.stderr.read()
    assert time.monotonic() - t0 < 10
    deadline = time.monotonic() + 2  # every process of the server's session (workers included) is gone
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    pytest.fail("a process of the server is left behind")
