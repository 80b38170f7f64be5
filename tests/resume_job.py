"""A training run that can SIGKILL itself at a given step, for the resume tests.

    python tests/resume_job.py OUT MODE [--kill_at N] [--resume] [--layer_decay D] [--layers L]
    torchrun --nproc_per_node 2 tests/resume_job.py OUT MODE --zero 2 ...   (DeepSpeed ZeRO-2 on 2 CPU ranks)

MODE: plain | unfreeze | adaptive | reinit (re-initialise the top block when training starts, never on resume) |
all (every control at once).
Writes OUT/final.safetensors and OUT/final_lrs.json at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import transformers as tf  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from test_trainer import text_data  # noqa: E402
from tiny_models import TEXT  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from llrd import LLRDTrainer, LLRDTrainingArguments  # noqa: E402

ZERO = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
}


class KillAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: as a preempted job dies


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("mode", choices=["plain", "unfreeze", "adaptive", "reinit", "all"])
    p.add_argument("--kill_at", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--layer_decay", type=float, default=0.5)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--zero", type=int, default=0, help="DeepSpeed ZeRO stage (0: no DeepSpeed)")
    ns = p.parse_args()
    torch.manual_seed(0)
    cfg = tf.BertConfig(num_hidden_layers=ns.layers, hidden_dropout_prob=0.1, **TEXT)  # dropout on: RNG must resume
    model = tf.BertForSequenceClassification(cfg)
    extra = {
        "plain": {},
        "unfreeze": {"gradual_unfreeze_every": 2},
        "adaptive": {"adaptive_lr": True},
        "reinit": {"reinit_top_blocks": 1},
        "all": {"reinit_top_blocks": 1, "gradual_unfreeze_every": 2, "adaptive_lr": True, "layer_stats": "all"},
    }[ns.mode]
    args = LLRDTrainingArguments(
        output_dir=ns.out,
        layer_decay=ns.layer_decay,
        learning_rate=1e-3,
        max_steps=8,
        save_strategy="steps",
        save_steps=2,
        per_device_train_batch_size=4,
        lr_scheduler_type="linear",
        warmup_steps=2,
        weight_decay=0.01,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        logging_steps=1,
        seed=0,
        deepspeed=ZERO | {"zero_optimization": {"stage": ns.zero}} if ns.zero else None,
        **extra,
    )
    callbacks = [KillAt(ns.kill_at)] if ns.kill_at else []
    trainer = LLRDTrainer(model=model, args=args, train_dataset=text_data(32), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=True if ns.resume else None)
    if trainer.is_world_process_zero():
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, f"{ns.out}/final.safetensors")
        lrs = [[g["group_name"], g["lr"], g["initial_lr"]] for g in trainer.optimizer.param_groups]
        Path(ns.out, "final_lrs.json").write_text(json.dumps(lrs))
    if torch.distributed.is_initialized():  # gloo ranks may abort at interpreter exit: leave once all is written
        torch.distributed.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
