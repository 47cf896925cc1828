"""The six-step transfer experiment (recipe `paw`): is a LoRA moved to another base model worth anything?

Per dataset: 1) evaluate the source base, 2) train the source LoRA, 3) transfer it to the target,
4) evaluate the target base, 5) evaluate the transferred LoRA, 6) train a LoRA on the target (the
baseline) and evaluate it. One table holds the five accuracies per dataset.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from loragen import io, rundir
from loragen.pipeline.engine import Step, quote

COLUMNS = ["source_base", "source_lora", "target_base", "transferred", "target_lora"]


def steps(cfg: DictConfig, root: Path) -> list[Step]:
    p = cfg.pipeline.paw
    src, tgt = p.source_model, p.target_model
    lora_ov = list(p.lora_overrides)
    eval_ov = list(p.eval_overrides)
    out: list[Step] = []

    def evaluate(name: str, ds: str, model: str, adapters: list[str], deps: list[str], base: bool) -> Step:
        return Step(f"{name}/{ds}", ["stage=evaluate", f"model={model}", f"dataset={ds}", f"eval.adapters={quote(adapters)}",
                                     f"eval.include_base={str(base).lower()}", *eval_ov], [rundir.RESULTS], deps)

    for ds in p.datasets:
        src_lora, transfer, tgt_lora = f"lora_source/{ds}", f"transfer/{ds}", f"lora_target/{ds}"
        out += [
            evaluate("eval_source_base", ds, src, [], [], True),
            Step(src_lora, ["stage=lora", f"model={src}", f"dataset={ds}", *lora_ov], [f"{rundir.FINAL}/adapter_config.json"]),
            Step(transfer, ["stage=transfer", f"model={tgt}", f"transfer.source_model={src}",
                            f"transfer.source_adapter={quote(str(root / src_lora / 'final'))}", *list(p.transfer_overrides)],
                 ["adapter/adapter_config.json"], [src_lora]),
            evaluate("eval_target_base", ds, tgt, [], [], True),
            evaluate("eval_transferred", ds, tgt, [str(root / transfer / rundir.ADAPTER)], [transfer], False),
            Step(tgt_lora, ["stage=lora", f"model={tgt}", f"dataset={ds}", *lora_ov], [f"{rundir.FINAL}/adapter_config.json"]),
            evaluate("eval_source_lora", ds, src, [str(root / src_lora / rundir.FINAL)], [src_lora], False),
            evaluate("eval_target_lora", ds, tgt, [str(root / tgt_lora / rundir.FINAL)], [tgt_lora], False),
        ]
    out.append(Step("report", ["stage=report", f"report.runs={quote([str(root)])}"], [rundir.REPORT], [s.name for s in out]))
    return out


def table(cfg: DictConfig, root: Path) -> list[dict]:
    """One row per dataset with the five accuracies (acc; acc_norm alongside where defined)."""
    sources = {"source_base": "eval_source_base", "source_lora": "eval_source_lora", "target_base": "eval_target_base",
               "transferred": "eval_transferred", "target_lora": "eval_target_lora"}
    rows = []
    for ds in cfg.pipeline.paw.datasets:
        row: dict = {"dataset": ds}
        for col, step in sources.items():
            (entry,) = [e for e in io.read_json(root / step / ds / rundir.RESULTS)["results"] if e["dataset"] == ds]
            row[col] = entry["acc"]
            row[f"{col}_norm"] = entry["acc_norm"]
            row["n"], row["split"] = entry["n"], entry["split"]
        rows.append(row)
    return rows


def markdown(cfg: DictConfig, rows: list[dict]) -> str:
    p = cfg.pipeline.paw
    lines = [f"# LoRA transfer: {p.source_model} → {p.target_model}", "",
             "| dataset (split, n) | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r['dataset']} ({r['split']}, {r['n']}) | " + " | ".join(f"{r[c]:.4f}" for c in COLUMNS) + " |")
    lines += ["", "acc (fraction correct). source_lora/target_lora: LoRAs trained on each model; transferred: the source",
              "LoRA projected onto the target without training (transfer_report.md in transfer/<dataset>/)."]
    return "\n".join(lines) + "\n"
