"""One process, a tiny BERT sharded by FSDP2 on a 2-D (1 x 1) device mesh, trained by LLRDTrainer.

    python tests/mesh2d_job.py OUT LAYER_STATS

Prints the per-depth keys of the training logs as JSON on the last line (tests/test_defaults_cost.py).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    out, level = sys.argv[1], sys.argv[2]
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_PORT", "29533")
    import tiny_models
    import torch
    import torch.distributed as dist
    from test_trainer import args, text_data
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from llrd import LLRDTrainer

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = tiny_models.make("bert")
    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("replicate", "shard"))
    for layer in model.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model._is_distributed_loading_by_transformers = True  # as from_pretrained(distributed_config=...) marks it
    trainer = LLRDTrainer(
        model=model,
        train_dataset=text_data(8),
        args=args(
            out, layer_decay=0.5, max_steps=2, logging_steps=1, layer_stats=level, use_cpu=True, save_strategy="no"
        ),
    )
    trainer.train()
    keys = sorted({k for h in trainer.state.log_history if "loss" in h for k in h if "/" in k})
    print(json.dumps(keys))


if __name__ == "__main__":
    import traceback

    from gloo_exit import leave

    try:
        main()
    except Exception:  # noqa: BLE001 - report, then leave: a gloo rank can abort in teardown
        traceback.print_exc()
        leave(1)
    leave(0)
