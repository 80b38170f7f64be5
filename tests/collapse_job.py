"""A DeepSpeed run whose per-layer rates collapse past the config guards, for the launch-check tests.

    torchrun --nproc_per_node 1 tests/collapse_job.py OUT CAUSE

CAUSE: ``ds_scheduler`` (a DeepSpeed scheduler with one warmup_max_lr) or ``ds_optimizer`` (a DeepSpeed
``optimizer`` section). Both are refused by llrd's guards when they sit in a config file; here the config is
built in code and the guard is switched off, as for anything no guard can see. The run must stop at the first
step with the launch check's error.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import tiny_models  # noqa: E402
from test_trainer import text_data  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

import llrd.trainer  # noqa: E402
from llrd import LLRDTrainer  # noqa: E402


def main() -> None:
    out, cause = sys.argv[1], sys.argv[2]
    config = {
        "zero_optimization": {"stage": 2},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
    }
    if cause == "ds_scheduler":
        config["scheduler"] = {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"},
        }
    else:
        config["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True}}
        config["zero_force_ds_cpu_optimizer"] = False
    llrd.trainer.check_distributed_setup = lambda args: None  # what no config guard can see
    args = TrainingArguments(
        out, learning_rate=1e-3, max_steps=3, per_device_train_batch_size=4, use_cpu=True, report_to="none",
        save_strategy="no", logging_steps=1, disable_tqdm=True, deepspeed=config,
    )  # fmt: skip
    LLRDTrainer(model=tiny_models.make("bert"), args=args, train_dataset=text_data(16), layer_decay=0.5).train()


if __name__ == "__main__":
    main()
