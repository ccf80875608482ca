"""End-to-end CPU comparison for the issue "apb ask on CPU: twice as fast as plain transformers".

One run, one machine, every contender as its own process timed from process start to exit (imports, load,
prefill, decode), on the same document and question with the same chat-templated prompt:

- `hf-gguf`:      transformers loads the embedded GGUF (de-quantisation) and calls `generate` (fp32, greedy)
- `hf-converted`: the same from the converted safetensors copy that apb caches
- `apb ...`:      `apb ask DOC QUESTION --json --max-new-tokens N` with the defaults, then any variants given

    python scripts/cpu_vs_transformers.py examples/sample.md "What is the secret passcode for the north archive?" \
        --new-tokens 32 --variant "--hosts 1" --variant "--dtype bf16"

Prints a markdown table (wall s, load, prefill, decode, ms/token, answer) and the ratios the issue asks for.
Only ratios from one run count: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _child_hf(prompt_file: str, new_tokens: int, from_gguf: bool, threads: int) -> None:
    sys.path.insert(0, str(ROOT))
    from apb_core.hf_reference import hf_generate

    from apb_core import models

    ids = json.loads(Path(prompt_file).read_text())
    run = hf_generate(models.resolve_model(None), ids, new_tokens, from_gguf=from_gguf, threads=threads)
    print(json.dumps(run.__dict__))


def _prompt_ids(document: str, question: str, new_tokens: int) -> list[int]:
    sys.path.insert(0, str(ROOT))
    from apb_core.prompt import build_prompt

    from apb_core import models

    source = models.resolve_model(None)
    tokenizer = models.load_tokenizer(source)
    window = models.model_window(models.load_config(source))
    prompt = build_prompt(tokenizer, document, question, window, new_tokens)
    return prompt.context_ids + prompt.query_ids


def _timed(cmd: list[str]) -> tuple[float, dict]:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return wall, json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("document")
    parser.add_argument("question")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--variant", action="append", default=[], help="extra `apb ask` options, one run each")
    parser.add_argument("--child", choices=["hf-gguf", "hf-converted"])
    parser.add_argument("--prompt-file")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if args.child:
        _child_hf(args.prompt_file, args.new_tokens, args.child == "hf-gguf", args.threads)
        return

    ids = _prompt_ids(Path(args.document).read_text(), args.question, args.new_tokens)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        prompt_file = Path(tmp) / "prompt.json"
        prompt_file.write_text(json.dumps(ids))
        for child in ("hf-gguf", "hf-converted"):
            wall, out = _timed([sys.executable, __file__, args.document, args.question, "--child", child,
                                "--prompt-file", str(prompt_file), "--new-tokens", str(args.new_tokens),
                                "--threads", str(args.threads)])
            rows.append((child, wall, out["load_s"], out["prefill_s"], out["decode_s"], out["generated_tokens"],
                         out["answer"]))
        for variant in ["", *args.variant]:
            cmd = [sys.executable, "-m", "apb_cli.main", "ask", args.document, args.question, "--json",
                   "--max-new-tokens", str(args.new_tokens), *shlex.split(variant)]
            wall, out = _timed(cmd)
            t = out["timings"]
            rows.append((f"apb {variant}".strip() + f" (H={out['hosts']})", wall, t["load_s"], t["prefill_s"],
                         t["decode_s"], out["generated_tokens"], out["answer"]))

    print(f"prompt tokens {len(ids)}, new tokens ≤ {args.new_tokens}, {os.cpu_count()} cores\n")
    print("| run | wall s (process) | load s | prefill s | decode s | ms/token | tokens | answer |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, wall, load, prefill, decode, tokens, answer in rows:
        per = 1e3 * decode / max(tokens - 1, 1)
        print(f"| {name} | {wall:.2f} | {load:.2f} | {prefill:.2f} | {decode:.2f} | {per:.0f} | {tokens} | "
              f"{answer[:60]!r} |")
    hf_wall, hf_gen = rows[0][1], rows[0][3] + rows[0][4]
    print()
    for name, wall, _, prefill, decode, _, answer in rows[2:]:
        print(f"{name}: end to end {wall / hf_wall:.2f}x of hf-gguf (target ≤ 0.5); prefill+decode "
              f"{(prefill + decode) / hf_gen:.2f}x of hf generate (target ≤ 0.9); same answer as hf: "
              f"{answer.strip() == rows[0][6].strip()}")


if __name__ == "__main__":
    main()
