"""The text recipe as the two-process gloo test launches it, plus two records that only the test needs (the
recipes write neither): each rank's group layout and a hash of its final weights, to check that the ranks
agree; and a file written by an atexit handler, to check that the gloo exit path still runs those handlers.

    accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml tests/ddp_fingerprint_job.py [recipe flags]
"""

from __future__ import annotations

import atexit
import hashlib
import json
import runpy
import sys
from pathlib import Path

from transformers import TrainerCallback

import llrd
from llrd.files import atomic_write_text

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "text_classification.py"


class Fingerprint(TrainerCallback):
    """At the end of training: ``fingerprint_rank{N}.json`` (world size, layout hash, weights hash) and an atexit
    handler that writes ``atexit_rank{N}``."""

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        weights = hashlib.sha256()
        for name, p in sorted(model.state_dict().items()):
            p = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2 DTensor shard -> the whole tensor
            weights.update(name.encode())
            weights.update(p.detach().cpu().contiguous().float().numpy().tobytes())
        layout = [(g["group_name"], g["initial_lr"], g["param_names"]) for g in optimizer.param_groups]
        record = {
            "rank": args.process_index,
            "world_size": args.world_size,
            "groups_sha": hashlib.sha256(json.dumps(layout).encode()).hexdigest(),
            "weights_sha": weights.hexdigest(),
        }
        out = Path(args.output_dir)
        atomic_write_text(out / f"fingerprint_rank{args.process_index}.json", json.dumps(record))
        atexit.register(atomic_write_text, out / f"atexit_rank{args.process_index}", "ran")


class FingerprintTrainer(llrd.LLRDTrainer):
    def __init__(self, *args, callbacks=None, **kwargs):
        super().__init__(*args, callbacks=[*(callbacks or []), Fingerprint()], **kwargs)


if __name__ == "__main__":
    llrd.LLRDTrainer = FingerprintTrainer  # the recipe's `from llrd import LLRDTrainer` picks this up
    sys.path.insert(0, str(RECIPE.parent))  # what running the recipe as a script does
    runpy.run_path(str(RECIPE), run_name="__main__")
