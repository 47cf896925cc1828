"""What the generator is compared with on a held-out dataset, in weight space.

- oracle: the held-out dataset's own trained LoRA (the target: error 0; its accuracy is the ceiling);
- average: the plain weight average of the training datasets' final LoRAs (every LoRA starts from one
  init seed, so averaging A and B separately is meaningful);
- nearest: the training dataset's final LoRA whose prompts are nearest to the held-out prompts
  (cosine of the mean prompt embeddings);
- mean checkpoint: the mean of every training checkpoint (what the residual generator starts from).
"""

from __future__ import annotations

from typing import Sequence

import torch

from loragen.lora.adapter_io import Adapter, lora_pairs


def weight_average(adapters: Sequence[Adapter]) -> Adapter:
    keys = list(adapters[0].tensors)
    tensors = {k: torch.stack([a.tensors[k].float() for a in adapters]).mean(0) for k in keys}
    return Adapter(dict(adapters[0].config), tensors)


def nearest_by_prompts(target: torch.Tensor, candidates: dict[str, torch.Tensor]) -> tuple[str, dict[str, float]]:
    """The name of the candidate embedding nearest (cosine) to `target`, and every cosine."""
    cos = {n: float(torch.nn.functional.cosine_similarity(target, e, dim=0)) for n, e in candidates.items()}
    return max(cos, key=cos.get), cos


def delta_weights(adapter: Adapter) -> dict[str, torch.Tensor]:
    """scale * B @ A per module: the weight change the adapter makes."""
    return {m: adapter.scale * (b.float() @ a.float()) for m, (a, b) in lora_pairs(adapter.tensors).items()}


def relative_error(adapter: Adapter, reference: Adapter) -> float:
    """||dW - dW_ref|| / ||dW_ref|| over all modules (Frobenius), dW = scale * B @ A."""
    got, ref = delta_weights(adapter), delta_weights(reference)
    num = sum(float((got[m] - ref[m]).square().sum()) for m in ref)
    den = sum(float(ref[m].square().sum()) for m in ref)
    return (num / den) ** 0.5 if den > 0 else float("inf")
