"""The run-directory layout: the name of every file and folder a stage writes and a pipeline or report reads.

Every stage writes its outputs under these names and everything that finds them (pipelines, reports, resume)
uses the same constants, so a name changes in one place. Paths are built from `runtime.run_dir()` (Hydra's
output dir); these are only the names inside it.
"""

from __future__ import annotations

# every run
CONFIG = "config.yaml"            # the resolved config
LOG = "loragen.log"
STATE = "state"                   # the loop's resumable full state (model, optimizer, scheduler, RNG)
TRAINER = "trainer.json"          # state/trainer.json: step, fingerprint, history

# stage=lora
FINAL = "final"                   # the final adapter (a PEFT dir)
CHECKPOINTS = "checkpoints"       # trajectory checkpoints step-XXXXXX/ (PEFT dirs)
MANIFEST = "manifest.json"        # checkpoints/manifest.json (rewritten at flushes) ...
MANIFEST_LOG = "manifest.jsonl"   # ... and checkpoints/manifest.jsonl (appended as each checkpoint lands)
BEST = "best"                     # the best adapter by ckpt.best_metric ...
BEST_RECORD = "best.json"         # ... and its record

# stage=evaluate (and every stage that evaluates)
RESULTS = "results.json"
SAMPLES = "samples.jsonl"
RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"

# stage=tokenize
TOKENS = "tokens.safetensors"
LAYOUT = "layout.json"
CHECKPOINT_LIST = "checkpoints.json"

# stage=generator / generate
METRICS = "metrics.json"          # the generator's summary and history
BASELINES = "baselines"           # baselines/<name>/: oracle, average, nearest, mean_checkpoint
BASELINE_RECORD = "baseline.json" # inside each baseline adapter dir
GENERATED = "generated"           # the generator run's own generated adapters gen-XXX/
ADAPTERS = "adapters"             # stage=generate's adapters gen-XXX/
PROMPTS_RECORD = "prompts.json"   # inside each generated adapter dir: the prompts that made it
GENERATE_SUMMARY = "generate.json"

# stage=transfer / export / chat
ADAPTER = "adapter"               # the transferred (or exported, merge=false) adapter
TRANSFER_REPORT = "transfer_report.json"
TRANSFER_REPORT_MD = "transfer_report.md"
MERGED = "merged"                 # export merge=true
CHAT_OUT = "chat.jsonl"

# stage=pipeline / report
TABLE = "table.json"
TABLE_CSV = "table.csv"
TABLE_MD = "table.md"
REPORT = "report.md"
STEP_RECORD = "fingerprint.json"


def generated_name(i: int) -> str:
    """The i-th generated adapter's dir name (gen-000, gen-001, ...)."""
    return f"gen-{i:03d}"
