"""stage=generate: prompts -> LoRA adapters, one forward pass of a trained HyperConv generator each.

    loragen stage=generate generate.checkpoint=<generator run> generate.prompts=arc_challenge:test \
        generate.num_adapters=10

Each adapter comes from its own random batch of generator.num_prompts prompts (seeded by generate.seed)
and is written as a PEFT directory `adapters/gen-XXX/` with a `prompts.json` naming the prompts that
made it and the split they came from. The default prompts are the held-out dataset's eval split (its task
descriptions for a generator trained with generator.condition=description). `generate.descriptions=[...]`
conditions on a list of task descriptions instead, so an adapter for an unseen task needs no data at all.
"""

from __future__ import annotations

import logging
import time

import torch
from omegaconf import DictConfig

from loragen import io, rundir, runtime
from loragen.errors import ConfigError
from loragen.generator.checkpoint import generator_config, load_generator
from loragen.generator.prompts import DESCRIPTION, dataset_spec, load_prompts
from loragen.generator.tasks import prompt_batches
from loragen.lora.adapter_io import write_adapter
from loragen.lora.tokenize import detokenize
from loragen.models.text_encoder import load_text_encoder

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    g = cfg.generate  # checked by loragen.stages.checks.check_generate before this runs
    out = runtime.run_dir()

    # setup: the generator, its encoder, the prompts
    gen_cfg = generator_config(cfg)
    model, layout, meta = load_generator(g.checkpoint, gen_cfg)
    if g.descriptions:
        source = "generate.descriptions"
        prompts = [str(t).strip() for t in g.descriptions if str(t).strip()]
        if not prompts:
            raise ConfigError("generate.descriptions is empty; give a list of task descriptions")
        origin = {"source": source, "dataset": None, "split": DESCRIPTION}
    else:
        source = g.prompts or _default_source(cfg, meta)
        prompts, origin = load_prompts(cfg, source, meta.get("dataset_specs"))
    if (origin["split"] == DESCRIPTION) != (meta.get("condition", "prompts") == "description"):
        log.warning("the generator was trained on %s but is given %s", meta.get("condition", "prompts"),
                    "task descriptions" if origin["split"] == DESCRIPTION else "prompts")
    device = _device(cfg)
    model.to(device)
    t0 = time.perf_counter()
    encoder = load_text_encoder(cfg.generator.encoder, cfg.paths, gen_cfg["prompt_len"], device=device)
    load_seconds = time.perf_counter() - t0
    batches = prompt_batches(len(prompts), gen_cfg["num_prompts"], int(g.num_adapters), int(g.seed),
                             strict=bool(g.strict), what=f"generate.prompts={source}")

    # generate: encode and decode on hardware.device (fp32), detokenize on the CPU (copies), write
    records = []
    for i, idx in enumerate(runtime.progress(batches, len(batches), "generate")):
        batch = [prompts[j] for j in idx.tolist()]
        start = time.perf_counter()
        states = encoder.encode(batch)
        encoded = time.perf_counter()
        with torch.no_grad():
            tokens = model(states.to(device).unsqueeze(0))[0]
        adapter = detokenize(tokens, layout)
        decoded = time.perf_counter()
        name = rundir.generated_name(i)
        info = {"name": name, "prompts": batch, **origin, "seed": int(g.seed), "batch": i,
                "generator": str(g.checkpoint), "heldout": meta.get("heldout")}
        path = write_adapter(out / rundir.ADAPTERS / name, adapter, extra_files={rundir.PROMPTS_RECORD: info})
        records.append({"name": name, "path": str(path), **origin, "num_prompts": len(batch),
                        "encode_seconds": encoded - start, "decode_seconds": decoded - encoded,
                        "seconds": decoded - start})

    summary = {
        "checkpoint": str(g.checkpoint), "device": device, "prompts": origin, "num_prompts_available": len(prompts),
        "encoder_load_seconds": load_seconds, "adapters": records,
        "mean_seconds_per_adapter": sum(r["seconds"] for r in records) / len(records),
    }
    if runtime.is_main():
        io.write_json(out / rundir.GENERATE_SUMMARY, summary)
    log.info("generated %d adapters in %s (%.3f s each, encoder included)", len(records), out / rundir.ADAPTERS,
             summary["mean_seconds_per_adapter"])
    return summary


def _device(cfg: DictConfig) -> str:
    """hardware.device, refused in one line when it names CUDA on a machine without it."""
    device = str(cfg.hardware.device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"hardware.device={device} but torch finds no CUDA device here; use hardware=cpu")
    return device


def _default_source(cfg: DictConfig, meta: dict) -> str:
    heldout = meta.get("heldout")
    if not heldout:
        raise ConfigError("generate.prompts is not set and the generator has no held-out dataset to default to; "
                          "give generate.prompts=<dataset>:<split> or a text file")
    if meta.get("condition") == "description":
        return f"{heldout}:{DESCRIPTION}"
    return f"{heldout}:{dataset_spec(cfg, heldout, meta.get('dataset_specs')).eval_split}"
