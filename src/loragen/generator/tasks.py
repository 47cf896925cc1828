"""One task per dataset or sub-task (`<dataset>@<group>`, loragen.data.subtasks): its token set (the LoRA
checkpoints as tokens), its cached prompt states and, for the task objective, its labeled training records.

Training pairs a fresh random batch of N prompts of task d with a random checkpoint of d (reconstruction)
and/or a random labeled mini-batch of d's train split (the task objective).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from loragen import rundir
from loragen.errors import ConfigError
from loragen.lora.tokenize import TokenSet
from loragen.models.token_loss import add_noise

log = logging.getLogger(__name__)


@dataclass
class Task:
    name: str
    tokens: TokenSet | None  # None: no LoRA trajectory (the task objective needs none)
    prompts: list[str]
    states: torch.Tensor  # [P, L, C] fp16: the encoder states of `prompts`
    split: str  # where the prompts came from (a split, or "description")
    token_dir: str | None
    records: list = field(default_factory=list)  # labeled training records (task objective)

    def final_tokens(self) -> torch.Tensor:
        """The last checkpoint's tokens [T, h, w] (the trained LoRA)."""
        if self.tokens is None:
            raise ConfigError(f"task {self.name} has no token set (generator.tokens.{self.name})")
        return self.tokens.tokens[-1]

    def prompt_embedding(self) -> torch.Tensor:
        """[C] mean over prompts of each prompt's unit-norm mean token state (padding states are zero)."""
        states = self.states.float()
        real = (states.abs().sum(-1) > 0).float().unsqueeze(-1)
        pooled = (states * real).sum(1) / real.sum(1).clamp_min(1)
        return torch.nn.functional.normalize(pooled, dim=-1).mean(0)


def check_layouts(token_sets: dict[str, TokenSet], out_shape: Sequence[int], dirs: dict[str, str]) -> None:
    """All token sets share one layout, and it is the generator's output shape."""
    first = next(iter(token_sets))
    for name, ts in token_sets.items():
        shape = tuple(ts.layout.shape)
        if shape != tuple(out_shape):
            raise ConfigError(
                f"token set {dirs[name]} ({name}) has tokens of shape {list(shape)} (num_tokens, h, w) but the "
                f"generator outputs {list(out_shape)} (the last of generator.features); make them equal"
            )
        if ts.layout.to_dict() != token_sets[first].layout.to_dict():
            raise ConfigError(
                f"token sets {dirs[first]} ({first}) and {dirs[name]} ({name}) have different layouts "
                f"(adapter config, tensors or, with scheme=flat, normalisation statistics); the generator needs "
                f"one layout for all datasets: tokenize every dataset with the same LoRA config and scheme=dnd"
            )


def mean_checkpoint(tasks: Sequence[Task], block: int = 64) -> torch.Tensor:
    """[T, h, w] mean of every checkpoint of every task (the residual base).

    Block of tokens by block: the same reduction over all checkpoints per cell (so the same bits) without
    concatenating every task's memory-mapped token set into one copy (7 GB at Qwen2.5-0.5B scale); equal bit
    for bit to that one-tensor mean (tests/test_tokenize_bits.py)."""
    sets = [t.tokens.tokens for t in tasks if t.tokens is not None]
    out = torch.empty(sets[0].shape[1:], dtype=torch.float32)
    for t0 in range(0, out.shape[0], block):
        out[t0 : t0 + block] = torch.cat([s[:, t0 : t0 + block] for s in sets]).float().mean(0)
    return out


def mean_token_std(tasks: Sequence[Task]) -> torch.Tensor:
    """[T] per-token std across checkpoints, averaged over tasks (the loss weights, before normalising)."""
    return torch.stack([t.tokens.token_std.float() for t in tasks if t.tokens is not None]).mean(0)


class PairSamples:
    """A virtual sequence of training samples: item i is (cond [N, L, C], target [T, h, w] when `targets`,
    records: a labeled mini-batch when `task_batch`) drawn by a generator seeded with (seed, i), so a step's
    samples depend only on its item indices (the loop resumes exactly)."""

    def __init__(self, tasks: Sequence[Task], num_prompts: int, *, noise_cond: float = 0.0, noise_target: float = 0.0,
                 seed: int = 0, length: int = 100_000, targets: bool = True, task_batch: int = 0):
        if not tasks:
            raise ConfigError("the generator has no training datasets (generator.datasets minus generator.heldout)")
        self.tasks, self.num_prompts, self.length = list(tasks), int(num_prompts), int(length)
        self.noise_cond, self.noise_target, self.seed = float(noise_cond), float(noise_target), int(seed)
        self.targets, self.task_batch = bool(targets), int(task_batch)
        for t in self.tasks:
            if len(t.prompts) < num_prompts:
                log.warning("%s has %d prompts, fewer than generator.num_prompts=%d: prompts are drawn with "
                            "replacement", t.name, len(t.prompts), num_prompts)
            if self.targets and t.tokens is None:
                raise ConfigError(f"task {t.name} has no token set: reconstruction needs generator.tokens.{t.name}")
            if self.task_batch and not t.records:
                raise ConfigError(f"task {t.name} has no labeled training records for the task objective")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        task = self.tasks[int(torch.randint(len(self.tasks), (1,), generator=gen))]
        ckpt = int(torch.randint(task.tokens.tokens.shape[0], (1,), generator=gen)) if self.targets else 0
        idx = pick(task.states.shape[0], self.num_prompts, gen)
        item: dict = {"cond": add_noise(task.states[idx].float(), self.noise_cond, gen)}
        if self.targets:
            item["target"] = add_noise(task.tokens.tokens[ckpt].float(), self.noise_target, gen)
        if self.task_batch:
            item["records"] = [task.records[j] for j in pick(len(task.records), self.task_batch, gen).tolist()]
        return item


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def labeled_collate(objective_collate: Callable[[list], dict]) -> Callable[[list[dict]], dict]:
    """`collate` for samples with a labeled mini-batch each: tensors stacked, each mini-batch collated by the
    base model's objective (tokenized on the loop's prefetch thread, like a LoRA run's batches)."""
    def fn(samples: list[dict]) -> dict:
        out: dict = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k != "records"}
        out["labeled"] = [objective_collate(s["records"]) for s in samples]
        return out
    return fn


def pick(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """k indices out of n: without replacement when n >= k, else with replacement."""
    return torch.randperm(n, generator=gen)[:k] if n >= k else torch.randint(n, (k,), generator=gen)


def prompt_batches(n: int, num_prompts: int, count: int, seed: int, strict: bool = False,
                   what: str = "prompts") -> list[torch.Tensor]:
    """`count` index batches of `num_prompts` prompts out of n (with replacement when too few, unless strict)."""
    if n < num_prompts:
        if strict:
            raise ConfigError(f"{what} has {n} prompts but the generator takes {num_prompts} per adapter "
                              f"(generator.num_prompts); strict mode refuses to sample with replacement")
        log.warning("%s has %d prompts, fewer than the generator's %d: sampling with replacement", what, n, num_prompts)
    gen = torch.Generator().manual_seed(seed)
    return [pick(n, num_prompts, gen) for _ in range(count)]


def token_dir_of(tokens_cfg, name: str) -> Path:
    if name not in tokens_cfg or not tokens_cfg[name]:
        hint = f"++generator.tokens={{{name}:<dir>,...}}" if "@" in name else f"+generator.tokens.{name}=<dir>"
        raise ConfigError(f"generator.tokens.{name} is not set: give the tokenize run dir of task {name} "
                          f"({hint}, a dir with tokens.safetensors and layout.json)")
    path = Path(str(tokens_cfg[name]))
    if not (path / rundir.TOKENS).is_file():
        raise ConfigError(f"generator.tokens.{name}={path}: no tokens.safetensors there (a tokenize run dir?)")
    return path
