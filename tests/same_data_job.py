"""``torchrun --nproc_per_node 2 tests/same_data_job.py OUT [--use_cpu]``: a tiny BERT under
``TrainingArguments(deepspeed=...)`` (ZeRO-2, CPU, gloo), 16 rows, batch 2, one epoch, layer_decay 0.5.

Without ``--use_cpu`` accelerate counts one process while torch.distributed has two, so both ranks would iterate
the whole dataset (8 steps instead of 4): the launch check must stop it (tests/test_launch_check.py). Prints the
number of optimizer steps on the last line when training ends.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    import tiny_models
    import torch
    from test_trainer import text_data

    from llrd import LLRDTrainer, LLRDTrainingArguments

    out, use_cpu = sys.argv[1], "--use_cpu" in sys.argv
    ds = {
        "zero_optimization": {"stage": 2},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
    }
    args = LLRDTrainingArguments(
        output_dir=out, deepspeed=ds, use_cpu=use_cpu, per_device_train_batch_size=2, num_train_epochs=1,
        learning_rate=1e-3, layer_decay=0.5, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
        logging_steps=1,
    )  # fmt: skip
    torch.manual_seed(0)
    trainer = LLRDTrainer(model=tiny_models.make("bert"), args=args, train_dataset=text_data(16))
    trainer.train()
    print(f"steps={trainer.state.global_step}")


if __name__ == "__main__":
    import traceback

    from gloo_exit import leave

    try:
        main()
    except Exception:  # noqa: BLE001 - report, then leave: a gloo rank can abort in teardown
        traceback.print_exc()
        leave(1)
    leave(0)
