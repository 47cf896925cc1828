"""Truncated SVDs of base weights: float32, signs fixed by a deterministic rule, cached on disk.

Singular vectors are defined up to a sign, and the transfer pairs source and target vectors by
index, so the sign must not depend on the LAPACK/cuSOLVER build: the largest-magnitude entry of
each u is made positive and the same flip is applied to its v (CPU and GPU then agree).

The cache holds one safetensors file per (model path, module) under `<cache_dir>/svd/`, with the
digest of the weight it was computed from; a file whose digest differs (the weights at that path
changed) or that holds fewer singular vectors than asked for is recomputed.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from loragen import io

log = logging.getLogger(__name__)


@dataclass
class SVD:
    U: torch.Tensor  # (m, k), orthonormal columns
    S: torch.Tensor  # (k,), descending
    V: torch.Tensor  # (n, k), orthonormal columns

    @property
    def k(self) -> int:
        return self.S.shape[0]

    def top(self, k: int) -> SVD:
        return SVD(self.U[:, :k], self.S[:k], self.V[:, :k])


def fix_signs(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each singular pair so that the largest-magnitude entry of u is positive."""
    idx = U.abs().argmax(dim=0)
    sign = torch.sign(U[idx, torch.arange(U.shape[1], device=U.device)])
    sign[sign == 0] = 1
    return U * sign, V * sign


def truncated_svd(weight: torch.Tensor, k: int, device: str | torch.device = "cpu") -> SVD:
    """Top-k singular triplets of `weight` (k is capped at min(m, n)), on `device` in float32, returned on CPU."""
    w = weight.detach().to(device=device, dtype=torch.float32)
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    k = min(k, S.shape[0])
    U, V = fix_signs(U[:, :k], Vh[:k].T)
    return SVD(U.contiguous().cpu(), S[:k].contiguous().cpu(), V.contiguous().cpu())


def weight_digest(weight: torch.Tensor) -> str:
    t = weight.detach().cpu().contiguous()
    h = hashlib.blake2b(f"{t.dtype}:{tuple(t.shape)}".encode(), digest_size=16)
    h.update(t.view(torch.uint8).numpy().data)
    return h.hexdigest()


class SVDCache:
    """`get(model_key, module, weight, k)`: the cached SVD, or a fresh one (then cached). root=None: no cache."""

    def __init__(self, root: str | Path | None, device: str | torch.device = "cpu"):
        self.root = Path(root) / "svd" if root is not None else None
        self.device = device
        self.hits = self.misses = 0

    def path(self, model_key: str, module: str) -> Path:
        assert self.root is not None
        base = re.sub(r"[^\w.-]+", "_", Path(model_key).name or "model")[-48:]
        slug = f"{base}-{hashlib.sha256(model_key.encode()).hexdigest()[:12]}"
        return self.root / slug / f"{module}.safetensors"

    def get(self, model_key: str, module: str, weight: torch.Tensor, k: int) -> SVD:
        if self.root is None:
            self.misses += 1
            return truncated_svd(weight, k, self.device)
        want = min(k, *weight.shape)
        path, digest = self.path(model_key, module), weight_digest(weight)
        cached = self._load(path, digest, want)
        if cached is not None:
            self.hits += 1
            return cached.top(want)
        self.misses += 1
        svd = truncated_svd(weight, want, self.device)
        with io.atomic_path(path) as tmp:
            save_file({"U": svd.U, "S": svd.S, "V": svd.V}, str(tmp),
                      metadata={"digest": digest, "module": module, "model": model_key})
        return svd

    @staticmethod
    def _load(path: Path, digest: str, want: int) -> SVD | None:
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("digest") != digest:
                    log.info("SVD cache %s is stale (weights changed); recomputing", path)
                    return None
                svd = SVD(f.get_tensor("U"), f.get_tensor("S"), f.get_tensor("V"))
        except (SafetensorError, OSError, KeyError) as e:
            log.warning("SVD cache %s unreadable (%s); recomputing", path, e)
            return None
        return svd if svd.k >= want else None
