"""stage=export: a PEFT adapter as a merged full model directory, or a copy of the adapter directory.

merge=true loads the base model (`model=`), checks that the adapter fits it, merges (PEFT
merge_and_unload) and saves the model (safetensors) and tokenizer: a directory that
`from_pretrained` loads with no PEFT. merge=false copies the adapter directory as it is. The
output appears at once (written to a temporary directory, then renamed); an existing output is
kept unless export.overwrite=true. `export.json` in the run dir records what was exported.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig

from loragen import io, provenance, runtime
from loragen.errors import ConfigError
from loragen.evaluation.adapters import check_adapter
from loragen.lora.adapter_io import read_adapter, read_adapter_config
from loragen.models import load_model

log = logging.getLogger(__name__)

EXPORT_INFO = "loragen_export.json"  # written next to the merged weights: base, adapter, loragen version


def run(cfg: DictConfig) -> dict:
    ex = cfg.export
    if not ex.adapter:
        raise ConfigError("stage=export: set export.adapter=<a PEFT adapter directory>")
    adapter = Path(str(ex.adapter)).expanduser()
    out = Path(str(ex.out)).expanduser() if ex.out else runtime.run_dir() / ("merged" if ex.merge else "adapter")
    check_output(out, adapter, bool(ex.overwrite))
    read_adapter(adapter)  # a readable, finite PEFT adapter, or a CheckpointError naming what is wrong
    if ex.merge:
        info = merge(cfg, adapter, out)
    else:
        with io.atomic_path(out) as tmp:
            shutil.copytree(adapter, tmp)
        info = {"model": None, "model_path": None}
    summary = {"adapter": str(adapter), "out": str(out), "merge": bool(ex.merge), **info}
    if runtime.is_main():
        io.write_json(runtime.run_dir() / "export.json", {**summary, "provenance": provenance.provenance(cfg)})
    if ex.merge:
        log.info("merged model (base %s + adapter %s) written to %s; load it with %s.from_pretrained(%r)",
                 info["model_path"], adapter, out, info["auto_class"], str(out))
    else:
        log.info("adapter %s copied to %s; load it with PeftModel.from_pretrained(base, %r)", adapter, out, str(out))
    return summary


def check_output(out: Path, adapter: Path, overwrite: bool) -> None:
    """Refuse an output that exists (unless overwrite), is a file, or overlaps the adapter being exported."""
    o, a = out.resolve(), adapter.resolve()
    if o == a or a in o.parents or o in a.parents:
        raise ConfigError(f"export.out={out} overlaps export.adapter={adapter}; choose another output directory")
    if out.is_file():
        raise ConfigError(f"export.out={out} is a file; expected a directory to create")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"export.out={out} already exists; set export.overwrite=true to replace it, or choose another")


def merge(cfg: DictConfig, adapter: Path, out: Path) -> dict:
    from peft import PeftModel

    lm = load_model(cfg.model, cfg.paths, cfg.hardware.precision, "cpu")
    check_adapter(lm.model, adapter)
    trained_on = read_adapter_config(adapter).get("base_model_name_or_path")
    if trained_on and trained_on != lm.path:
        log.info("adapter %s names base %s; merging it into %s (its shapes fit)", adapter, trained_on, lm.path)
    merged = PeftModel.from_pretrained(lm.model, str(adapter), is_trainable=False).merge_and_unload()
    info = {"model": lm.name, "model_path": lm.path, "kind": lm.kind, "precision": cfg.hardware.precision,
            "auto_class": AUTO_CLASSES.get(lm.kind, "AutoModel")}
    with io.atomic_path(out) as tmp:
        merged.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        (tmp / EXPORT_INFO).write_text(json.dumps({"adapter": str(adapter), **info}, indent=2) + "\n")
    return info


AUTO_CLASSES = {"causal": "AutoModelForCausalLM", "seq2seq": "AutoModelForSeq2SeqLM", "encoder": "AutoModel"}
