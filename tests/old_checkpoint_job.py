"""A tiny Funnel run whose checkpoints carry the depths of the llrd that wrote them (for test_resume_layout.py).

    PYTHONPATH=<tree> python tests/old_checkpoint_job.py OUT [--resume]

Funnel groups its layers by index only (``encoder.blocks.{i}.{j}``): llrd before 0.2 made 3 stacks of 1, 2 and 1
blocks, today's rule one stack of 4, so a checkpoint of the old rule resumes only if its recorded layout decides.
Trains 4 steps (a checkpoint every 2) and writes OUT/final.safetensors.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import transformers as tf  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from test_trainer import text_data  # noqa: E402

from llrd import LLRDTrainer, LLRDTrainingArguments  # noqa: E402


def model() -> tf.FunnelForSequenceClassification:
    torch.manual_seed(0)
    cfg = tf.FunnelConfig(vocab_size=99, block_sizes=[1, 2, 1], d_model=8, n_head=2, d_head=4, d_inner=12,
                          hidden_dropout=0.1, max_position_embeddings=64)  # fmt: skip
    return tf.FunnelForSequenceClassification(cfg)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--resume", action="store_true")
    ns = p.parse_args()
    net = model()
    args = LLRDTrainingArguments(
        output_dir=ns.out,
        layer_decay=0.5,
        learning_rate=1e-3,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        per_device_train_batch_size=4,
        lr_scheduler_type="linear",
        weight_decay=0.01,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    trainer = LLRDTrainer(model=net, args=args, train_dataset=text_data(16))
    trainer.train(resume_from_checkpoint=True if ns.resume else None)
    save_file({n: q.detach().contiguous() for n, q in net.named_parameters()}, f"{ns.out}/final.safetensors")


if __name__ == "__main__":
    main()
