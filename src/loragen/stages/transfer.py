"""stage=transfer: move a LoRA adapter from `transfer.source_model` to `model` without training.

Writes into the run dir: `adapter/` (a PEFT adapter for the target), `transfer_report.json` and
`transfer_report.md` (per module: similarity, transferred or skipped, ‖ΔW_s‖, ‖ΔW_t‖ and the
relative error of the rank-r re-factorization).

Adapter provenance: this stage deliberately moves an adapter to another base model. The source adapter's
recorded base model is compared with transfer.source_model (a warning when they differ: the transfer reads the
source model's weights); the adapter written records the *target* model (`model`) as its base, and where it
came from (`transferred_from` in loragen_base.json), so evaluating it on the target passes the provenance check.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from loragen import io, provenance, rundir, runtime
from loragen.errors import ConfigError
from loragen.lora.adapter_io import base_mismatch, base_record, read_adapter, write_adapter
from loragen.lora.svd_cache import SVDCache
from loragen.lora.transfer import TransferResult, TransferSettings, model_weights, require_some, transfer_adapter
from loragen.models import resolve_model_path

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    out = runtime.run_dir()
    t = cfg.transfer
    settings = transfer_settings(t)  # every config check before any weight is read
    source_cfg = source_model_config(str(t.source_model))

    adapter = read_adapter(t.source_adapter)
    source_path = resolve_model_path(source_cfg, cfg.paths)
    target_path = resolve_model_path(cfg.model, cfg.paths)
    source_base = base_record(source_path, model=source_cfg.name)["base_model"]
    mismatch = base_mismatch(t.source_adapter, source_base["config"], source_path)
    if mismatch is not None:
        log.warning("transfer.source_adapter=%s was written for base model %s, not transfer.source_model=%s: %s",
                    t.source_adapter, mismatch[0], source_cfg.name, mismatch[1])
    cache = SVDCache(cfg.paths.cache_dir if t.svd_cache else None, device=svd_device(cfg.hardware.device))
    result = transfer_adapter(adapter, model_weights(source_path), model_weights(target_path), settings, cache)

    summary = {"source_model": source_cfg.name, "source_model_path": source_path, "source_adapter": str(t.source_adapter),
               "target_model": cfg.model.name, "target_model_path": target_path,
               "settings": OmegaConf.to_container(t, resolve=True), "num_modules": len(result.modules),
               "num_transferred": len(result.transferred), "svd_cache": {"hits": cache.hits, "computed": cache.misses},
               "adapter_path": str(out / rundir.ADAPTER), "modules": result.modules}
    if runtime.is_main():
        io.write_json(out / rundir.TRANSFER_REPORT, {**summary, "provenance": provenance.provenance(cfg)})
        io.write_text(out / rundir.TRANSFER_REPORT_MD, report_markdown(summary, result))
        require_some(result, settings.similarity_threshold)
        target = base_record(target_path, model=cfg.model.name, transferred_from={
            "model": source_cfg.name, "name_or_path": source_path, "adapter": str(t.source_adapter)})
        write_adapter(out / rundir.ADAPTER, config=result.config, tensors=result.tensors, base=target)
        log.info("transferred %d of %d modules; adapter in %s", len(result.transferred), len(result.modules), out / rundir.ADAPTER)
    return summary


def transfer_settings(t: DictConfig) -> TransferSettings:
    for key in ("source_model", "source_adapter"):
        if not t.get(key):
            raise ConfigError(f"transfer.{key} is not set; usage: loragen stage=transfer model=<target> "
                              "transfer.source_model=<model config name> transfer.source_adapter=<adapter dir>")
    settings = TransferSettings(rank_svd=t.rank_svd, similarity_threshold=t.similarity_threshold,
                                layer_map=t.layer_map, module_map=dict(t.module_map or {}))
    settings.check()
    return settings


def source_model_config(name: str) -> DictConfig:
    from loragen.config_dir import conf_dir

    models = Path(conf_dir()) / "model"
    path = models / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"transfer.source_model={name!r}: no {path}; valid: {sorted(p.stem for p in models.glob('*.yaml'))}")
    return OmegaConf.load(path)


def svd_device(device: str) -> str:
    """The hardware's device when it is usable (SVDs are float32 there), else the CPU."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        log.warning("hardware.device=%s but CUDA is not available; SVDs run on the CPU", device)
        return "cpu"
    return str(device)


def report_markdown(summary: dict, result: TransferResult) -> str:
    lines = [f"# Transfer {summary['source_model']} → {summary['target_model']}", "",
             f"Source adapter: `{summary['source_adapter']}`", "",
             f"{summary['num_transferred']} of {summary['num_modules']} modules transferred "
             f"(threshold {summary['settings']['similarity_threshold']}, rank_svd {summary['settings']['rank_svd']}, "
             f"layer_map {summary['settings']['layer_map']}).", "",
             "| target module | source module | k | similarity (out / in) | random level | transferred | "
             "‖ΔW_s‖ | ‖ΔW_t‖ | rank-r rel. error |", "|---|---|---|---|---|---|---|---|---|"]
    for m in result.modules:
        if "similarity" not in m:
            lines.append(f"| {m['target_module']} | {m['source_module']} | | | | no: {m['reason']} | | | |")
            continue
        err = f"{m['rel_reconstruction_error']:.2e}" if m["transferred"] else ""
        lines.append(f"| {m['target_module']} | {m['source_module']} | {m['k']} | {m['similarity']:.4f} "
                     f"({m['similarity_out']:.4f} / {m['similarity_in']:.4f}) | {m['random_level']:.4f} | "
                     f"{'yes' if m['transferred'] else 'no: ' + m['reason']} | {m['norm_delta_source']:.4g} | "
                     f"{m['norm_delta_target']:.4g} | {err} |")
    return "\n".join(lines) + "\n"
