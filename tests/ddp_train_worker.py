"""Run under `torchrun --nproc_per_node N` (or plainly): train tiny_qwen2 a few steps, save the LoRA tensors.

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_train_worker.py OUT PER_DEVICE_BATCH EXPECTED_WORLD
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accelerate import Accelerator  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from loragen.train import fit  # noqa: E402
from loragen.train.state import trainable_tensors  # noqa: E402
from tests.train_helpers import records, tiny_lora, train_cfg  # noqa: E402


def main(out: str, per_device_batch: int, expected_world: int) -> None:
    acc = Accelerator(cpu=True)
    assert acc.num_processes == expected_world, f"world size {acc.num_processes}, expected {expected_world}"
    if expected_world > 1:
        import torch.distributed as dist

        assert dist.get_world_size() == expected_world and dist.get_backend() == "gloo"
    cache = os.environ.get("LORAGEN_CACHE_DIR") or str(Path.home() / ".cache" / "loragen")
    paths = OmegaConf.create({"data_dir": None, "models_dir": None, "cache_dir": cache})
    model, obj, _ = tiny_lora(paths)
    cfg = train_cfg(per_device_batch=per_device_batch, max_steps=3)
    res = fit(model, obj.loss, records(), obj.collate, cfg, accelerator=acc, state_dir=Path(out) / f"state{expected_world}")
    if acc.is_main_process:
        save_file({k: v.contiguous() for k, v in trainable_tensors(model).items()}, out + f"/lora{expected_world}.safetensors")
        Path(out, f"loss{expected_world}.txt").write_text(" ".join(str(h["loss"]) for h in res.history))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
