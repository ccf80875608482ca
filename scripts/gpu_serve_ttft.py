"""Time to first token of `apb serve` for a document it has cached (the serve issue's GPU target).

Starts `apb serve` with the given model and placement, then for each document streams one question (a cache
miss: prefill + query + first token) and `--hits` further questions about it (cache hits), and measures on the
client the time from sending the request to the first SSE event (the server answers 200 only once the first
token exists, so that event is the first token). The server's own timings (from the final event's `apb` object)
are recorded beside it. Stdlib HTTP only, so it runs where no httpx is installed:

    python scripts/gpu_serve_ttft.py --model qwen.gguf --device cuda --hosts 2 --workers 1 --out ttft.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QUESTIONS = [
    "What is the secret passcode for the north archive?",
    "Who keeps the north archive?",
    "What is the passcode of the north archive? Answer with the number only.",
    "Which archive has a secret passcode?",
    "Summarise the document in one sentence.",
    "What is the north archive's passcode?",
]


def documents(long_tokens: int) -> dict[str, str]:
    """examples/sample.md (~3.4K tokens) and, when long_tokens > 0, the same text inside ~long_tokens tokens of
    real prose (the eval's haystack corpus), so the passcode sits in the middle of a long document."""
    sample = (ROOT / "examples" / "sample.md").read_text()
    docs = {"sample.md": sample}
    if long_tokens > 0:
        from apb_core.eval.prose import prose_text

        prose = prose_text()[: long_tokens * 4]  # ~4 characters per token of English prose
        half = len(prose) // 2
        docs[f"prose+sample ~{long_tokens // 1024}K"] = prose[:half] + "\n\n" + sample + "\n\n" + prose[half:]
    return docs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def stream(port: int, document: str, question: str, apb: dict | None, max_tokens: int) -> dict:
    """One streamed completion: client time to the first event and to the end, the text, the server's timings."""
    body = {"messages": [{"role": "system", "content": document}, {"role": "user", "content": question}],
            "stream": True, "max_tokens": max_tokens, **({"apb": apb} if apb else {})}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    first_s, text, final = None, [], None
    if resp.status != 200:
        return {"status": resp.status, "error": resp.read().decode()[:300], "total_s": time.perf_counter() - t0}
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        if first_s is None:
            first_s = time.perf_counter() - t0
        data = line[len("data: "):]
        if data == "[DONE]":
            break
        event = json.loads(data)
        if "error" in event:  # the generation failed after its first token (e.g. a stuck worker: 503 inside)
            conn.close()
            return {"status": 200, "error": event["error"].get("message", ""), "ttft_s": first_s,
                    "total_s": time.perf_counter() - t0, "answer": "".join(text)}
        text.append(event["choices"][0]["delta"].get("content", ""))
        if "apb" in event:
            final = event["apb"]
    total_s = time.perf_counter() - t0
    conn.close()
    result = (final or {}).get("result", {})
    return {"status": 200, "ttft_s": first_s, "total_s": total_s, "answer": "".join(text),
            "cache_hit": (final or {}).get("cache_hit"), "reused_prefill": (final or {}).get("reused_prefill"),
            "prompt_tokens": result.get("prompt_tokens"), "compressor": result.get("compressor"),
            "auto_exact": result.get("auto_exact"),
            "timings": result.get("timings")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--hosts", type=int, default=2)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--hits", type=int, default=5)
    p.add_argument("--long-tokens", type=int, default=16384)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    port = _free_port()
    cmd = [sys.executable, "-m", "apb_cli.main", "serve", "--port", str(port), "--device", args.device,
           "--hosts", str(args.hosts), *(["--model", args.model] if args.model else []),
           *(["--workers", str(args.workers)] if args.workers else [])]
    log = open(Path(args.out).with_suffix(".server.log"), "w")
    t_start = time.perf_counter()
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    report: dict = {"command": " ".join(cmd[1:]), "runs": []}
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit(f"server exited with {server.returncode}")
            try:
                if _get(port, "/health") == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        report["ready_s"] = round(time.perf_counter() - t_start, 2)
        print(f"server ready after {report['ready_s']} s", flush=True)
        for name, doc in documents(args.long_tokens).items():
            for apb in (None, {"reuse": True}):
                # a fresh miss per option: the reuse runs keep their own cache entry (cache key includes nothing of
                # the question, so the first reuse request is already a hit; record it as such)
                for i, question in enumerate(QUESTIONS[: args.hits + 1]):
                    run = stream(port, doc, question, apb, args.max_tokens)
                    run.update(document=name, question=question, apb=apb, index=i)
                    report["runs"].append(run)
                    print(f"{name:22} {json.dumps(apb):18} q{i} ttft {(run.get('ttft_s') or 0) * 1e3:8.1f} ms  "
                          f"total {run.get('total_s', 0):6.2f} s  hit {run.get('cache_hit')}  "
                          f"reused {run.get('reused_prefill')}  tokens {run.get('prompt_tokens')}  "
                          f"{(run.get('error') or run.get('answer', ''))[:60]!r}", flush=True)
        hits = [r["ttft_s"] for r in report["runs"] if r.get("cache_hit") and r.get("ttft_s")]
        if hits:
            report["hit_ttft_ms_median"] = round(1e3 * statistics.median(hits), 1)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
