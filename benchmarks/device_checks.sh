#!/usr/bin/env bash
# The GPU checks the open issues owe, most valuable first, inside one device call of at most 10 minutes:
# each step gets the time left (LIMIT seconds in all) and writes its JSON/log under $OUT as it goes, so a
# call cut short still returns what finished. Run from the repository root on the GPU host:
#     bash benchmarks/device_checks.sh e2e,gpu_tests [LIMIT]
# Steps: e2e (issue 25: every stage at full size, 80 GiB, through the stage CLI; sampling does not fit in
# the same call after 8 steps and a validation clip), e2e_sample (2 steps, no validation, then T2V and
# I2V), gpu_tests (the CUDA tests), swap_tests (only those of quantized block swap, pinned buffers and the allocator,
# about a minute: before card24 in one call), pinned_tests (tests/test_pinned.py alone), train_ratio / sample_ratio (issue 25: defaults against the official code compiled per block, one
# process), dit_before_after (issue 27: bench_dit at a0d98cc, exported to .before/, and now), adapters (issue 29),
# validation (issue 30: distilled against 40-step CFG validation), alloc (issue 25: 8 steps over 5 bucket
# shapes with expandable_segments, reserved against allocated), card24 / card16 (issue 25: the card capped;
# CARD_STAGES=checkpoint,dataset,scan,cache,train runs it without sampling, which does not fit in the same call),
# cards_sample (both caps' T2V sampling, base model, 4 steps), card16_sample (the 16 GiB one alone), card24_long / card16_long (12 training steps
# without validation: every bucket shape, and the I2V sample, met twice, for the steady step), card24_lora /
# card16_lora (2 training steps, then I2V sampling with the LoRA beside the base: the capped stages T2V left out).
set -u
STEPS=${1:-e2e,gpu_tests}
END=$(( $(date +%s) + ${2:-570} ))
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OFFICIAL_LONGCAT=${OFFICIAL_LONGCAT:-.official}
left() { echo $(( END - $(date +%s) )); }
step() {  # step NAME SECONDS_AT_LEAST COMMAND...
    local name=$1 need=$2; shift 2
    if [ "$(left)" -lt "$need" ]; then echo "$name: skipped, $(left) s left" | tee -a "$OUT/steps.txt"; return; fi
    local t0=$(date +%s)
    timeout "$(left)" "$@" > "$OUT/$name.log" 2>&1
    echo "$name: rc=$? in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/steps.txt"
    tail -n 12 "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/steps.txt"
for s in ${STEPS//,/ }; do
    # each of these writes a 36 GiB checkpoint: a warm machine still holds the last one (64 GiB disk)
    case $s in e2e|e2e_sample|alloc|validation|card*) rm -rf /tmp/e2e /tmp/bench_validation ;; esac
    case $s in
        e2e) step e2e 300 python3 benchmarks/e2e_full_size.py --work /tmp/e2e --train-steps 8 --sample-steps 4 \
                 --validation-steps 4 --stages checkpoint,dataset,scan,cache,train,sample_t2v --out "$OUT/e2e.json" ;;
        e2e_sample) step e2e_sample 300 python3 benchmarks/e2e_full_size.py --work /tmp/e2e --train-steps 2 \
                 --skip-validation --sample-steps 4 --stages checkpoint,dataset,scan,cache,train,sample_t2v,sample_i2v \
                 --out "$OUT/e2e_sample.json" ;;
        gpu_tests) step gpu_tests 60 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short --show-capture=no \
                 -rf tests/test_bsa.py tests/test_quant_attention.py tests/test_qk_rope.py tests/test_gpu_train.py tests/test_model_files.py \
                 tests/test_memory.py ;;
        swap_tests) step swap_tests 60 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short --show-capture=no \
                 -rf tests/test_memory.py tests/test_pinned.py \
                 "tests/test_gpu_train.py::test_int8_base_with_block_swap_trains_as_without" ;;
        pinned_tests) step pinned_tests 30 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short \
                 --show-capture=no -rf tests/test_pinned.py ;;
        train_ratio) step train_ratio 240 python3 benchmarks/bench_official.py --cases train_dense --official blocks \
                 --ours defaults,fp8_blocks_selective --repeat 2 --warmup 1 --out "$OUT/train_ratio.json" ;;
        sample_ratio) step sample_ratio 150 python3 benchmarks/bench_official.py --cases sample_dense \
                 --official blocks --ours sample_defaults,blocks_cudnn,fp8_q8_blocks --repeat 3 --out "$OUT/sample_ratio.json" ;;
        dit_before_after)
            step dit_before 100 bash -c "cd .before && PYTHONPATH=/tmp/site:\$PWD python3 benchmarks/bench_dit.py \
                 --cases train_bf16 --repeat 2 --out $OUT/dit_before.json"
            step dit_after 100 python3 benchmarks/bench_dit.py --cases train_bf16 --repeat 2 \
                 --out "$OUT/dit_after.json" ;;
        adapters) step adapters 200 python3 benchmarks/bench_adapters.py --repeat 2 --out "$OUT/adapters.json" ;;
        validation) step validation 450 python3 benchmarks/bench_validation.py --out "$OUT/validation.json" ;;
        alloc) step alloc 300 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python3 benchmarks/e2e_full_size.py \
                 --work /tmp/e2e --train-steps 8 --skip-validation --stages checkpoint,dataset,scan,cache,train \
                 --out "$OUT/alloc.json" ;;
        int4_probe)  # issue 25: the 24 GiB card's training setting (int4 + activation offload), uncapped
            step int4_compiled 200 python3 benchmarks/bench_dit.py --cases train_int4_compile_offload --repeat 2 \
                 --out "$OUT/int4_compiled.json"
            step int4_expandable 200 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python3 benchmarks/bench_dit.py \
                 --cases train_int4_compile_offload --repeat 2 --out "$OUT/int4_expandable.json"
            step int4_eager 150 python3 benchmarks/bench_dit.py --cases train_int4_offload --repeat 2 \
                 --out "$OUT/int4_eager.json" ;;
        card24|card16) step "$s" 400 python3 benchmarks/e2e_full_size.py --work /tmp/e2e --cards "${s#card}" \
                 --train-steps 4 --validation-steps 4 --sample-steps 4 \
                 --stages "${CARD_STAGES:-checkpoint,dataset,scan,cache,train,sample_t2v}" --out "$OUT/$s.json" ;;
        cards_sample) step cards_sample 300 python3 benchmarks/e2e_full_size.py --work /tmp/e2e --cards 24,16 \
                 --sample-steps 4 --stages checkpoint,dataset,scan,sample_t2v --out "$OUT/cards_sample.json" ;;
        card16_sample) step card16_sample 150 python3 benchmarks/e2e_full_size.py --work /tmp/e2e --cards 16 \
                 --sample-steps 4 --stages checkpoint,dataset,scan,sample_t2v --out "$OUT/card16_sample.json" ;;
        card24_long|card16_long) c=${s#card}; step "$s" 450 python3 benchmarks/e2e_full_size.py --work /tmp/e2e \
                 --cards "${c%_long}" --train-steps 12 --skip-validation \
                 --stages checkpoint,dataset,scan,cache,train --out "$OUT/$s.json" ;;
        card24_lora|card16_lora) c=${s#card}; step "$s" 300 python3 benchmarks/e2e_full_size.py --work /tmp/e2e \
                 --cards "${c%_lora}" --train-steps 2 --skip-validation --sample-steps 4 \
                 --stages checkpoint,dataset,scan,cache,train,sample_i2v --out "$OUT/$s.json" ;;
        *) echo "unknown step $s" ;;
    esac
done
cat "$OUT/steps.txt"
