"""Training-free transfer of a LoRA adapter to another base model (LoRA-X style).

Per target module, with ΔW_s = scale·B·A from the source adapter and the top-k singular vectors
(U_s, V_s) of the source base weight and (U_t, V_t) of the target base weight:

- each side (output side with U, input side with V) is projected on its own:
  same dim:       X -> U_t U_tᵀ X      (the identity when k reaches the dim: the complete basis)
  different dims: X -> U_t U_sᵀ X      (vectors paired by index; signs fixed in svd_cache)
  so ΔW_t = U_t U_tᵀ ΔW_s V_t V_tᵀ when the shapes match and U_t (U_sᵀ ΔW_s V_s) V_tᵀ when they differ.
- k = min(rank_svd, rank(W_s), rank(W_t)), the same on both sides and for both models.
- similarity of a side: ‖U_sᵀU_t‖_F² / k, in [0, 1]. Equal dims: the full vectors (random subspaces
  give k/d). Unequal dims: the leading min(d_s, d_t) coordinates of each basis (still ≤ 1, since
  ‖XᵀY‖_F² ≤ ‖X‖_2²‖Y‖_F² with orthonormal columns; random level k·d/(d_s·d_t)). A side whose dim
  is reached by rank_svd has similarity 1 (the complete basis). The module's similarity is the
  smaller of the two sides; it is transferred only when that reaches `similarity_threshold`.
- ΔW_t is re-factored to the source rank r by SVD (B′ = U√S, A′ = √S Vᵀ) and written with
  lora_alpha = r (scale 1: the source scale is inside ΔW_t). Skipped modules are left out of
  target_modules, which lists exact module names.

Layers: `index` pairs layer j with layer j (target layers beyond the source's are reported as
skipped); `depth` maps target layer j to source layer ⌊j·(L_s−1)/(L_t−1) + ½⌋, first to first and
last to last (the same as index when the counts agree). Modules are paired by their name inside
the layer, or by the last name component through MODULE_ALIASES and `module_map`.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from loragen.errors import CheckpointError, ConfigError, LoragenError
from loragen.lora.adapter_io import PEFT_PREFIX, Adapter, lora_pairs
from loragen.lora.svd_cache import SVD, SVDCache

log = logging.getLogger(__name__)

LAYER_MAPS = ("index", "depth")
# Leaf names of other families -> the q/k/v/o/gate/up/down names of Llama, Qwen2, Gemma2, Mistral.
MODULE_ALIASES = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "w1": "gate_proj", "w3": "up_proj",
                  "w2": "down_proj"}
_LAYERED = re.compile(r"^(?P<pre>(?:.*\.)?)(?P<idx>\d+)\.(?P<suffix>.+)$")


# ---- base weights ---------------------------------------------------------------------------------

@dataclass
class ModelWeights:
    """A base model's per-layer 2-D weights, by module name, loaded on demand."""

    key: str  # the model path: identifies the weights for the SVD cache
    shapes: dict[str, tuple[int, int]]  # module name (weight name without .weight) -> (out, in)
    load: Callable[[str], torch.Tensor]
    layers: dict[int, dict[str, str]] = field(init=False)  # layer index -> {suffix in the layer: module name}

    def __post_init__(self) -> None:
        self.layers = defaultdict(dict)
        for name in self.shapes:
            m = _LAYERED.match(name)
            if m:
                other = self.layers[int(m["idx"])].setdefault(m["suffix"], name)
                if other != name:  # e.g. T5: encoder.block.0.layer.0.SelfAttention.q and decoder.block.0.layer.0...
                    raise ConfigError(f"{self.key}: {other} and {name} are both layer {m['idx']}'s {m['suffix']}; "
                                      f"transfer maps one stack of numbered layers (decoder-only or encoder-only "
                                      f"models), not encoder-decoder models")
        self.layers = dict(sorted(self.layers.items()))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def weight(self, module: str) -> torch.Tensor:
        return self.load(module + ".weight")

    @classmethod
    def from_tensors(cls, key: str, tensors: dict[str, torch.Tensor]) -> ModelWeights:
        """From a state dict (names ending in .weight)."""
        shapes = {k[: -len(".weight")]: tuple(v.shape) for k, v in tensors.items() if k.endswith(".weight") and v.ndim == 2}
        return cls(key, shapes, tensors.__getitem__)

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelWeights:
        """From a Hugging Face model dir's safetensors files (sharded or not), without loading the model."""
        from safetensors import safe_open

        path = Path(path)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ConfigError(f"{path}: no *.safetensors weight files; transfer reads base weights from safetensors")
        where: dict[str, Path] = {}
        shapes: dict[str, tuple[int, int]] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    shape = h.get_slice(k).get_shape()
                    if k.endswith(".weight") and len(shape) == 2:
                        shapes[k[: -len(".weight")]] = tuple(shape)
                        where[k] = f

        def load(name: str) -> torch.Tensor:
            with safe_open(str(where[name]), framework="pt") as h:
                return h.get_tensor(name)

        return cls(str(path), shapes, load)


def model_weights(path: str) -> ModelWeights:
    """Base weights of a local model dir, or of a Hub id (its safetensors files, from the Hub cache)."""
    if Path(path).is_dir():
        return ModelWeights.from_dir(path)
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(path, allow_patterns=["*.safetensors", "*.json"])
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated: all a user-side problem
        raise ConfigError(f"model {path!r} is not a local directory and could not be fetched from the Hub: {e}") from None
    return ModelWeights.from_dir(local)


# ---- settings and results -------------------------------------------------------------------------

@dataclass
class TransferSettings:
    rank_svd: int = 320
    similarity_threshold: float = 0.0
    layer_map: str = "depth"
    module_map: dict[str, str] = field(default_factory=dict)

    def check(self) -> None:
        t = self.similarity_threshold
        if not isinstance(t, (int, float)) or not 0.0 <= float(t) <= 1.0 or math.isnan(float(t)):
            raise ConfigError(f"transfer.similarity_threshold={t!r} is outside [0, 1] (similarities lie in [0, 1])")
        if self.layer_map not in LAYER_MAPS:
            raise ConfigError(f"transfer.layer_map={self.layer_map!r}; expected one of {list(LAYER_MAPS)}")
        if not isinstance(self.rank_svd, int) or self.rank_svd < 1:
            raise ConfigError(f"transfer.rank_svd={self.rank_svd!r}; expected a positive integer")


@dataclass
class TransferResult:
    config: dict  # adapter_config.json for the target
    tensors: dict[str, torch.Tensor]  # PEFT saved names -> tensors
    modules: list[dict]  # one report row per target module considered

    @property
    def transferred(self) -> list[dict]:
        return [m for m in self.modules if m["transferred"]]


# ---- mapping ----------------------------------------------------------------------------------------

def layer_mapping(num_source: int, num_target: int, how: str) -> list[int | None]:
    """Source layer for each target layer (None: no source layer)."""
    if how == "index":
        return [j if j < num_source else None for j in range(num_target)]
    if num_target == 1:
        return [0]
    return [math.floor(j * (num_source - 1) / (num_target - 1) + 0.5) for j in range(num_target)]  # half up


def _leaf(suffix: str) -> str:
    return suffix.rsplit(".", 1)[-1]


def _match_suffix(suffix: str, target_layer: dict[str, str], module_map: dict[str, str]) -> str | None:
    """The target suffix (name inside a layer) for a source suffix, or None."""
    leaf = _leaf(suffix)
    mapped = module_map.get(leaf, MODULE_ALIASES.get(leaf, leaf))
    if suffix in target_layer and mapped == leaf:
        return suffix
    found = [s for s in target_layer if _leaf(s) == mapped]
    if len(found) > 1:
        raise ConfigError(f"module {suffix!r} -> {mapped!r} is ambiguous in the target: {found}; set transfer.module_map")
    return found[0] if found else None


# ---- the projection ---------------------------------------------------------------------------------

@dataclass
class _Side:
    """How one side (outputs: U, inputs: V) of ΔW is carried over; `apply(X)` maps along dim 0."""

    similarity: float
    random_level: float
    src: torch.Tensor | None  # None: the identity (complete basis of an equal dim)
    tgt: torch.Tensor | None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.tgt is None else self.tgt @ (self.src.T @ x)


def _side(Bs: torch.Tensor, Bt: torch.Tensor, k: int, rank_svd: int) -> _Side:
    ds, dt = Bs.shape[0], Bt.shape[0]
    Bs, Bt = Bs[:, :k], Bt[:, :k]
    if ds == dt:
        if rank_svd >= ds:
            return _Side(1.0, 1.0, None, None)
        sim = float((Bs.T @ Bt).pow(2).sum()) / k
        return _Side(min(sim, 1.0), k / ds, Bt, Bt)  # U_t U_tᵀ
    d = min(ds, dt)
    sim = float((Bs[:d].T @ Bt[:d]).pow(2).sum()) / k
    return _Side(min(sim, 1.0), k * d / (ds * dt), Bs, Bt)  # U_t U_sᵀ


def project(left: torch.Tensor, right: torch.Tensor, src: SVD, tgt: SVD, rank_svd: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """ΔW_t = L ΔW_s Rᵀ for ΔW_s = left @ right, returned as factors (L·left) @ (right·Rᵀ).

    The map is linear in ΔW_s, so the factors give the very matrix of the formula on ΔW_s; ΔW_t
    keeps rank ≤ r, which makes its re-factorization cheap (`refactor`).
    """
    k = min(src.k, tgt.k)
    out, inp = _side(src.U, tgt.U, k, rank_svd), _side(src.V, tgt.V, k, rank_svd)
    stats = {"k": k, "similarity": min(out.similarity, inp.similarity), "similarity_out": out.similarity,
             "similarity_in": inp.similarity, "random_level": min(out.random_level, inp.random_level)}
    return out.apply(left), inp.apply(right.T).T, stats


def refactor(left: torch.Tensor, right: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r SVD factors A′ = √S Vᵀ (r, in), B′ = U √S (out, r) of ΔW = left @ right.

    The SVD of the product is taken through thin QRs of its factors (ΔW = Q_l (R_l R_rᵀ) Q_rᵀ), so
    it costs O((out + in)·r²) instead of a dense SVD of ΔW.
    """
    ql, rl = torch.linalg.qr(left)
    qr_, rr = torch.linalg.qr(right.T)
    um, S, vmh = torch.linalg.svd(rl @ rr.T)
    q = min(r, S.shape[0])
    root = S[:q].sqrt()
    B, A = (ql @ um[:, :q]) * root, root[:, None] * (vmh[:q] @ qr_.T)
    if q < r:  # rank r exceeds the target's dims: the extra components are exactly zero
        B = torch.cat([B, B.new_zeros(B.shape[0], r - q)], dim=1)
        A = torch.cat([A, A.new_zeros(r - q, A.shape[1])], dim=0)
    return A, B


# ---- the transfer -----------------------------------------------------------------------------------

def _source_modules(adapter: Adapter, source: ModelWeights) -> dict[int, dict[str, tuple]]:
    """layer -> {suffix: (module name, A, B)}, checked against the source model's shapes."""
    where = adapter.path or "the source adapter"
    cfg = adapter.config
    if cfg.get("use_dora"):
        raise CheckpointError(f"{where}: DoRA adapters (use_dora) cannot be transferred; ΔW is not B·A")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise CheckpointError(f"{where}: per-module {key} is not supported by the transfer")
    pairs = lora_pairs(adapter.tensors)
    if not pairs:
        raise CheckpointError(f"{where}: no lora_A/lora_B pairs")
    out: dict[int, dict[str, tuple]] = defaultdict(dict)
    for prefix, (A, B) in sorted(pairs.items()):
        name = prefix[len(PEFT_PREFIX):] if prefix.startswith(PEFT_PREFIX) else prefix
        m = _LAYERED.match(name)
        if m is None:
            raise CheckpointError(f"{where}: module {name} is not inside a numbered layer; transfer maps per-layer modules only")
        if name not in source.shapes:
            raise CheckpointError(f"{where}: module {name} is not a linear weight of the source model {source.key}")
        want = source.shapes[name]
        if (B.shape[0], A.shape[1]) != want or A.shape[0] != B.shape[1]:
            raise CheckpointError(
                f"{where}: module {name} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, which do not fit the "
                f"source model {source.key} weight of shape {want} (out, in); was the adapter trained on another base?")
        out[int(m["idx"])][m["suffix"]] = (name, A, B)
    return dict(out)


def check_module_sets(suffixes: set[str], target: ModelWeights, module_map: dict[str, str]) -> dict[str, str]:
    """Source suffix -> target suffix; an error listing both sets when some source module has no counterpart."""
    target_suffixes = {s for layer in target.layers.values() for s in layer}
    all_target = {s: s for s in target_suffixes}
    mapping, missing = {}, []
    for s in sorted(suffixes):
        t = _match_suffix(s, all_target, module_map)
        (missing.append(s) if t is None else mapping.__setitem__(s, t))
    if missing:
        raise ConfigError(
            f"incompatible module sets: source adapter modules {sorted(suffixes)} ({missing} have no counterpart); "
            f"target model {target.key} has linear modules {sorted(target_suffixes)}; map names with "
            f"transfer.module_map={{source_name: target_name}}")
    return mapping


def transfer_adapter(adapter: Adapter, source: ModelWeights, target: ModelWeights, settings: TransferSettings,
                     cache: SVDCache | None = None) -> TransferResult:
    """Project `adapter` (trained on `source`) onto `target`; report every target module considered."""
    settings.check()
    cache = cache or SVDCache(None)
    src_modules = _source_modules(adapter, source)
    suffix_map = check_module_sets({s for layer in src_modules.values() for s in layer}, target, settings.module_map)
    src_layers, tgt_layers = sorted(source.layers), sorted(target.layers)
    mapping = layer_mapping(len(src_layers), len(tgt_layers), settings.layer_map)
    scale = adapter.scale
    svds: dict[tuple[str, str], SVD] = {}

    def svd(weights: ModelWeights, name: str) -> SVD:
        if (weights.key, name) not in svds:
            svds[weights.key, name] = cache.get(weights.key, name, weights.weight(name), settings.rank_svd)
        return svds[weights.key, name]

    rows, tensors, targets = [], {}, []
    for j, i in zip(tgt_layers, mapping):
        src_layer = None if i is None else src_layers[i]
        if src_layer is None:
            for suffix in sorted({s for layer in src_modules.values() for s in layer}):
                rows.append({"target_module": target.layers[j].get(suffix_map[suffix]), "source_module": None,
                             "transferred": False, "reason": f"no source layer for target layer {j} (layer_map=index)"})
            continue
        for suffix, (sname, A, B) in sorted(src_modules.get(src_layer, {}).items()):
            tname = target.layers[j].get(suffix_map[suffix])
            if tname is None:
                rows.append({"target_module": None, "source_module": sname, "transferred": False,
                             "reason": f"target layer {j} has no {suffix_map[suffix]}"})
                continue
            left, right = scale * B.float(), A.float()
            lt, rt, stats = project(left, right, svd(source, sname), svd(target, tname), settings.rank_svd)
            dw = lt @ rt
            row = {"target_module": tname, "source_module": sname, "source_shape": list(source.shapes[sname]),
                   "target_shape": list(target.shapes[tname]), **stats,
                   "norm_delta_source": float((left @ right).norm()), "norm_delta_target": float(dw.norm())}
            if stats["similarity"] + 1e-9 < settings.similarity_threshold:
                row.update(transferred=False, reason=f"similarity {stats['similarity']:.4f} < threshold "
                                                     f"{settings.similarity_threshold}")
            else:
                a2, b2 = refactor(lt, rt, A.shape[0])
                err = float((dw - b2 @ a2).norm() / dw.norm()) if dw.norm() > 0 else 0.0
                row.update(transferred=True, reason="", rank=a2.shape[0], rel_reconstruction_error=err)
                tensors[f"{PEFT_PREFIX}{tname}.lora_A.weight"] = a2.to(A.dtype).contiguous()
                tensors[f"{PEFT_PREFIX}{tname}.lora_B.weight"] = b2.to(B.dtype).contiguous()
                targets.append(tname)
            rows.append(row)
    log.info("transfer: %d of %d modules transferred (SVD cache: %d hits, %d computed)",
             len(targets), len(rows), cache.hits, cache.misses)
    return TransferResult(target_config(adapter.config, targets, target.key), tensors, rows)


def target_config(source_config: dict, targets: list[str], base_path: str) -> dict:
    """The source adapter's config for the target: exact module names, lora_alpha = r (scale 1)."""
    config = json.loads(json.dumps(source_config))
    r = int(config["r"])
    config.update(target_modules=sorted(targets), lora_alpha=r, use_rslora=False, base_model_name_or_path=base_path,
                  layers_to_transform=None, layers_pattern=None, rank_pattern={}, alpha_pattern={})
    return config


def require_some(result: TransferResult, threshold: float) -> None:
    """An error when no module reached the threshold (an adapter with no module would not load)."""
    if not result.transferred:
        sims = [m["similarity"] for m in result.modules if "similarity" in m]
        best = f"{max(sims):.4f}" if sims else "n/a"
        raise LoragenError(f"no module reached transfer.similarity_threshold={threshold} "
                           f"(highest similarity {best}); nothing to write")
