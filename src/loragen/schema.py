"""Typed config schemas: dataclasses registered in Hydra's ConfigStore (group `schema`) and put under the YAML
configs by their defaults lists (`- /schema@lora: lora`). The YAML files keep every value (one source of truth;
every schema field is MISSING here); the schemas add types and the set of keys, so a wrong type
(`train.max_steps=abc`) or an unknown key is refused when the config is composed, naming the key, before any
model, tokenizer or dataset is loaded and before any SLURM submission. Cross-key rules live in each stage's
`validate(cfg)` (see loragen.stages.checks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

# `from __future__ import annotations` makes annotations strings; OmegaConf resolves them with typing.get_type_hints,
# so the names above must stay importable from this module.


@dataclass
class TrainSchema:
    max_steps: int = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    betas: List[float] = MISSING
    eps: float = MISSING
    schedule: str = MISSING
    warmup_steps: int = MISSING
    min_lr_ratio: float = MISSING
    grad_accum: int = MISSING
    max_grad_norm: float = MISSING
    per_device_batch: int = MISSING
    seed: int = MISSING
    resume: str = MISSING
    save_state_every: int = MISSING
    eval_every: int = MISSING
    log_every: int = MISSING


@dataclass
class LoraGenerationSchema:
    chat_template: Any = MISSING  # auto | true | false
    system: Optional[str] = MISSING
    max_new_tokens: int = MISSING
    do_sample: bool = MISSING
    temperature: float = MISSING
    top_p: float = MISSING


@dataclass
class LoraSchema:
    r: int = MISSING
    alpha: float = MISSING
    dropout: float = MISSING
    base_dropout: bool = MISSING
    target_modules: List[str] = MISSING
    init_seed: int = MISSING
    datasets: Optional[List[str]] = MISSING
    temperature: float = MISSING
    max_length: int = MISSING
    train_limit: Optional[int] = MISSING
    eval_limit: Optional[int] = MISSING
    final_eval_limit: Optional[int] = MISSING
    eval_base: bool = MISSING
    eval_generate: bool = MISSING
    generation: LoraGenerationSchema = field(default_factory=LoraGenerationSchema)


@dataclass
class CkptSchema:
    every: int = MISSING
    start_step: int = MISSING
    keep_last: Optional[int] = MISSING
    best_metric: Optional[str] = MISSING
    best_mode: Optional[str] = MISSING


@dataclass
class EvalGenerationSchema:
    max_new_tokens: int = MISSING
    letter_max_new_tokens: int = MISSING
    do_sample: bool = MISSING
    temperature: float = MISSING
    top_p: float = MISSING
    chat_template: Any = MISSING
    system: Optional[str] = MISSING


@dataclass
class EvalSchema:
    split: Optional[str] = MISSING
    adapters: Any = MISSING  # [dir, ...] or {label: dir}
    include_base: bool = MISSING
    limit: Optional[int] = MISSING
    sample_ratio: Optional[float] = MISSING
    batch_size: int = MISSING
    method: str = MISSING
    generation: EvalGenerationSchema = field(default_factory=EvalGenerationSchema)
    num_fewshot: int = MISSING
    fewshot_split: Optional[str] = MISSING
    apply_chat_template: bool = MISSING
    overwrite: bool = MISSING
    allow_base_mismatch: bool = MISSING
    overlong: str = MISSING  # error | truncate


@dataclass
class TokenizeSchema:
    checkpoints: Optional[str] = MISSING
    max_checkpoints: Optional[int] = MISSING
    scheme: str = MISSING
    chunk: Optional[int] = MISSING
    token_shape: Optional[List[int]] = MISSING
    analyze: bool = MISSING


@dataclass
class GeneratorSchema:
    """The generator group (architecture and prompt pool); stage=generator adds its training keys."""
    encoder: Any = MISSING
    num_prompts: int = MISSING
    prompt_len: int = MISSING
    prompt_pool: int = MISSING
    features: List[List[int]] = MISSING
    kernel_size: int = MISSING
    residual: bool = MISSING
    border_bound: Optional[List[float]] = MISSING
    noise_cond: float = MISSING
    noise_target: float = MISSING


@dataclass
class GeneratorTaskSchema:
    batch_size: int = MISSING
    max_length: int = MISSING
    temperature: float = MISSING
    zero_std: float = MISSING


@dataclass
class GeneratorTrainingSchema(GeneratorSchema):
    datasets: Optional[List[str]] = MISSING
    heldout: Optional[str] = MISSING
    tokens: Dict[str, Any] = MISSING
    eval_adapters: int = MISSING
    objective: str = MISSING
    condition: str = MISSING
    init_seed: int = MISSING
    task: GeneratorTaskSchema = field(default_factory=GeneratorTaskSchema)


@dataclass
class LossSchema:
    mse_weight: float = MISSING
    l1_weight: float = MISSING
    recon_weight: float = MISSING
    task_weight: float = MISSING


@dataclass
class GenerateSchema:
    checkpoint: Optional[str] = MISSING
    prompts: Optional[str] = MISSING
    descriptions: Optional[List[str]] = MISSING
    num_adapters: int = MISSING
    seed: int = MISSING
    strict: bool = MISSING


@dataclass
class TransferSchema:
    source_model: Optional[str] = MISSING
    source_adapter: Optional[str] = MISSING
    rank_svd: int = MISSING
    similarity_threshold: float = MISSING
    layer_map: str = MISSING
    module_map: Dict[str, str] = MISSING
    svd_cache: bool = MISSING


@dataclass
class HardwareSchema:
    name: str = MISSING
    device: str = MISSING
    precision: str = MISSING
    cpu_linear: str = MISSING
    num_processes: int = MISSING
    per_device_batch: int = MISSING
    eval_batch_size: int = MISSING


@dataclass
class DataSchema:
    skip_invalid: bool = MISSING
    hash_train_fraction: float = MISSING


@dataclass
class DataStageSchema(DataSchema):
    to_instruction: bool = MISSING


@dataclass
class PipelineSchema:
    recipe: Optional[str] = MISSING
    executor: str = MISSING
    workers: int = MISSING
    dry_run: bool = MISSING


@dataclass
class DndRecipeSchema:
    datasets: List[str] = MISSING
    heldout: Optional[List[str]] = MISSING
    num_generated: int = MISSING
    lora_overrides: List[str] = MISSING
    tokenize_overrides: List[str] = MISSING
    generator_overrides: List[str] = MISSING
    generator_train_overrides: List[str] = MISSING
    eval_overrides: List[str] = MISSING
    eval_other_loras: bool = MISSING
    multitask: bool = MISSING
    multitask_steps: Optional[int] = MISSING
    multitask_overrides: List[str] = MISSING
    generators: Dict[str, Any] = MISSING


@dataclass
class PipelineDndSchema(PipelineSchema):
    dnd: DndRecipeSchema = field(default_factory=DndRecipeSchema)


@dataclass
class PawRecipeSchema:
    source_model: str = MISSING
    target_model: str = MISSING
    datasets: List[str] = MISSING
    lora_overrides: List[str] = MISSING
    transfer_overrides: List[str] = MISSING
    eval_overrides: List[str] = MISSING


@dataclass
class PipelinePawSchema(PipelineSchema):
    paw: PawRecipeSchema = field(default_factory=PawRecipeSchema)


SCHEMAS = {
    "train": TrainSchema, "lora": LoraSchema, "ckpt": CkptSchema, "eval": EvalSchema, "tokenize": TokenizeSchema,
    "generator": GeneratorSchema, "generator_training": GeneratorTrainingSchema, "loss": LossSchema,
    "generate": GenerateSchema, "transfer": TransferSchema, "hardware": HardwareSchema, "data": DataSchema,
    "data_stage": DataStageSchema, "pipeline": PipelineSchema, "pipeline_dnd": PipelineDndSchema,
    "pipeline_paw": PipelinePawSchema,
}


def register() -> None:
    """Store every schema as `schema/<name>` (idempotent; loragen's import does it)."""
    cs = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        cs.store(group="schema", name=name, node=node)
