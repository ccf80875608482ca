#!/usr/bin/env bash
# GPU runs of the bench issue, one call each on the device machine (see docs/benchmarks.md):
#   scripts/gpu_bench.sh kernels   one GPU: kernel correctness + APB-mask microbenchmark + 1-GPU bench smoke
#   scripts/gpu_bench.sh x2        two GPUs: apb bench at 32K, 64K, 128K with every method, APB breakdown
#   scripts/gpu_bench.sh smoke     two GPUs: apb bench at 32K with every engine method (the restructure's check)
# Full logs and JSON go to $OUT (the device tool brings them back); a compact table is printed last.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # multicast stays off
export PYTHONUNBUFFERED=1 PYTHONPATH=. COLUMNS=200 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # one allocator pool across lengths and methods
OUT=${OUT:-/tmp/apb-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}

date -u +"%Y-%m-%dT%H:%M:%SZ" | tee "$OUT/env.txt"
nvidia-smi -L | tee -a "$OUT/env.txt"
nvidia-smi topo -m >> "$OUT/env.txt" 2>&1
$PY -c 'import torch, transformers; print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version(),
"transformers", transformers.__version__, "gpus", torch.cuda.device_count())' | tee -a "$OUT/env.txt"

case "${1:-}" in
kernels)
    timeout 330 $PY scripts/gpu_kernels.py --out "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
    echo "gpu_kernels exit $?"
    timeout 200 $PY -m apb_cli.main bench --preset llama-3.1-8b --len 32k --hosts 1 --methods single --repeat 2 \
        --decode-tokens 8 --json > "$OUT/smoke.json" 2> "$OUT/smoke.log"
    echo "bench smoke exit $?"
    tail -n 5 "$OUT/smoke.log"
    $PY scripts/bench_summary.py "$OUT/smoke.json"
    cat "$OUT/kernels.log" | tail -n 40
    ;;
x2)
    timeout 560 $PY -m apb_cli.main bench --preset llama-3.1-8b --len 32k,64k,128k --hosts 2 \
        --methods single,ring,ulysses,star,apb --repeat 2 --breakdown apb --json --plot "$OUT/bench.png" \
        > "$OUT/bench.json" 2> "$OUT/bench.log"
    echo "bench exit $?"
    tail -n 12 "$OUT/bench.log"
    $PY scripts/bench_summary.py "$OUT/bench.json"
    ;;
smoke)
    timeout 400 $PY -m apb_cli.main bench --device cuda --preset llama-3.1-8b --len 32k --hosts 2 \
        --methods single,ring,ulysses,full,star,apb --repeat 2 --decode-tokens 16 --breakdown apb --json \
        > "$OUT/smoke.json" 2> "$OUT/smoke.log"
    echo "bench exit $?"
    tail -n 30 "$OUT/smoke.log"
    $PY scripts/bench_summary.py "$OUT/smoke.json"
    ;;
decode)
    timeout 240 $PY scripts/gpu_decode.py --preset llama-3.1-8b --len ${DECODE_LEN:-8k} --tokens 48 --out "$OUT/decode_check.json" \
        > "$OUT/decode_check.log" 2>&1
    echo "decode check exit $?"
    cat "$OUT/decode_check.log" | tail -n 30
    for mode in eager graph; do
        timeout 200 $PY -m apb_cli.main bench --device cuda --preset llama-3.1-8b --len 32k --hosts 2 \
            --methods single,full,apb --repeat 1 --decode-tokens 32 --breakdown none --decode $mode --json \
            > "$OUT/decode_32k_$mode.json" 2> "$OUT/decode_32k_$mode.log"
        echo "bench 32k $mode exit $?"
    done
    timeout 400 $PY -m apb_cli.main bench --device cuda --preset llama-3.1-8b --len 128k --hosts 2 \
        --methods single,ring,full,star,apb --repeat 2 --decode-tokens 128 --breakdown none --json \
        > "$OUT/bench_128k.json" 2> "$OUT/bench_128k.log"
    echo "bench 128k exit $?"
    tail -n 40 "$OUT/bench_128k.log"
    ;;
answer)
    # the answer-time issue's table: every method at 128K, balanced layout (the default), decode in CUDA graphs
    timeout 560 $PY -m apb_cli.main bench --device cuda --preset llama-3.1-8b --len 128k --hosts 2 \
        --methods hf,single,ring,ulysses,full,star,apb --repeat 2 --decode-tokens 128 --breakdown apb --json \
        > "$OUT/answer_128k.json" 2> "$OUT/answer_128k.log"
    echo "bench 128k exit $?"
    tail -n 60 "$OUT/answer_128k.log" | grep -v "^[┏┡└]"
    ;;
startup)
    # wall time of `apb ask` outside prefill and decode: a tiny model with the embedded tokenizer (carried in
    # .gpu/tiny-smol-vocab), 2 GPUs, three runs in a row (the first pays the cold imports)
    for i in 1 2 3; do
        t0=$(date +%s.%N)
        timeout 120 $PY -m apb_cli.main ask examples/sample.md "What is the secret passcode for the north archive?" \
            --model .gpu/tiny-smol-vocab --device cuda --hosts 2 --json --max-new-tokens 16 \
            > "$OUT/startup_$i.json" 2> "$OUT/startup_$i.log"
        code=$?
        t1=$(date +%s.%N)
        echo "ask run $i exit $code wall $($PY -c "print(round($t1 - $t0, 2))") s"
        $PY -c "import json,sys; d=json.load(open('$OUT/startup_$i.json')); print(' ', {k: round(v, 2) for k, v in d['timings'].items()})" 2>/dev/null
    done
    ;;
questions)
    timeout 400 $PY -m apb_cli.main bench --device cuda --preset llama-3.1-8b --len 128k --hosts 2 \
        --methods single,apb --repeat 1 --decode-tokens 128 --breakdown none --questions 4 --json \
        > "$OUT/questions_128k.json" 2> "$OUT/questions_128k.log"
    echo "bench questions exit $?"
    tail -n 30 "$OUT/questions_128k.log" | grep -v "^[┏┡└]"
    ;;
*)
    echo "usage: scripts/gpu_bench.sh kernels|x2|smoke|decode|answer|startup|questions" >&2
    exit 2
    ;;
esac
