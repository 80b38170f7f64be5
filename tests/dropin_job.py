"""2 gloo ranks for tests/test_dropin.py (one launch, two checks):

    torchrun --nproc_per_node 2 tests/dropin_job.py OUT

1. DDP training of a block-less regression MLP with default LLRDTrainer and with Trainer: the same losses and
   weights, bit for bit, and the same callbacks;
2. LLRD's groups over DTensors on two device meshes: split by mesh (as Trainer splits its own groups), each
   group keeping its rate; the optimizer steps with its foreach kernels.

Writes OUT/ok-<rank> ("ok") when both hold.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from test_dropin import RegressionMLP, base_args, regression_data  # noqa: E402
from torch import nn  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from llrd import LLRDTrainer, LLRDTrainingArguments  # noqa: E402


def ddp_run(cls, out):
    arguments = (TrainingArguments if cls is Trainer else LLRDTrainingArguments)(
        **base_args(out, ddp_backend="gloo", gradient_accumulation_steps=2, per_device_train_batch_size=2)
    )
    trainer = cls(model=RegressionMLP(), args=arguments, train_dataset=regression_data())
    trainer.train()
    timed = ("runtime", "per_second")
    logs = [{k: v for k, v in h.items() if not any(t in k for t in timed)} for h in trainer.state.log_history]
    return trainer, logs, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


class TwoMeshModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)) for _ in range(2))
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def mesh_split(out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    meshes = [init_device_mesh("cpu", (2,), mesh_dim_names=(name,)) for name in ("dp", "ep")]
    assert meshes[0] != meshes[1]
    model = TwoMeshModel()
    for block in model.layers:  # in each block, one linear on each mesh: every depth's group mixes the meshes
        for linear, mesh in zip(block, meshes, strict=True):
            for name, param in list(linear.named_parameters()):
                setattr(linear, name, nn.Parameter(distribute_tensor(param.detach(), mesh, [Shard(0)])))
    arguments = LLRDTrainingArguments(
        **base_args(out, layer_decay=0.5, block_pattern=r"layers\.\d+", weight_decay=0.0, ddp_backend="gloo")
    )
    trainer = LLRDTrainer(model=model, args=arguments)
    optimizer = trainer.create_optimizer()

    def mesh_of(p):
        return p.device_mesh if isinstance(p, DTensor) else None

    for group in optimizer.param_groups:
        assert len({mesh_of(p) for p in group["params"]}) == 1, group["group_name"]
        assert len(group["params"]) == len(group["param_names"])
    scales = {n: g["lr_scale"] for g in optimizer.param_groups for n in g["param_names"]}
    expected = {f"layers.{i}.{j}.{w}": 0.5 ** (2 - i) for i in (0, 1) for j in (0, 1) for w in ("weight", "bias")}
    assert scales == {**expected, "head.weight": 1.0, "head.bias": 1.0}, scales
    assert len(optimizer.param_groups) == 2 * 2 * 2 + 2  # (depth, decay) x mesh, and the head's two
    meshes_seen = {mesh_of(p) for g in optimizer.param_groups for p in g["params"]}
    assert meshes_seen == {None, *meshes}
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    optimizer.step()  # foreach AdamW: would fail on a group that mixes meshes


def main():
    out = Path(sys.argv[1])
    (t_ref, l_ref, w_ref) = ddp_run(Trainer, out / "ref")
    (t_ours, l_ours, w_ours) = ddp_run(LLRDTrainer, out / "ours")
    assert dist.is_initialized() and dist.get_world_size() == 2
    assert l_ours == l_ref, (l_ours, l_ref)
    assert all(torch.equal(w_ours[n], w_ref[n]) for n in w_ref)
    assert t_ours.callback_handler.callback_list == t_ref.callback_handler.callback_list
    mesh_split(out / "mesh")
    (out / f"ok-{dist.get_rank()}").write_text("ok")


if __name__ == "__main__":
    import traceback

    from gloo_exit import leave

    try:
        main()
    except Exception:  # noqa: BLE001 - report, then leave: a gloo rank can abort in teardown
        traceback.print_exc()
        leave(1)
    leave(0)
