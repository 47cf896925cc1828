"""The one training loop every trainable stage uses (Accelerate, plain PyTorch).

    result = fit(model, loss_fn, items, collate, cfg.train, accelerator=acc, state_dir=run / rundir.STATE,
                 fingerprint={...}, tracker=tracker, eval_fn=..., checkpointer=...)

- `loss_fn(model, batch) -> (summed loss, number of loss units)`: a sum, not a mean. The loop
  normalises by the global number of units of the optimizer step (all micro-batches of all
  processes), so N processes and one process with the same global batch take the same step.
- `items` is any sequence (e.g. MCRecords); `collate(list of items) -> batch` builds a micro-batch.
  The next micro-batch is built on a prefetch thread during the current one's forward/backward
  (loragen.train.prefetch): `items[i]` and `collate` must not use the global RNG.
  Which items form each step is a pure function of (train.seed, step) (see batches.StepBatches).
- AdamW (the fused kernel on CPU/CUDA) over the parameters with requires_grad, warmup + cosine/linear
  schedule, gradient accumulation, clipping, mixed precision (the accelerator's), NaN/inf detection
  before the update.
- A full state (trainable params, optimizer, scheduler, RNG, step) is saved atomically every
  `train.save_state_every` steps, at the end, and at the next step boundary after SIGUSR2/SIGTERM/SIGINT
  (train.preemption); `train.resume=auto` continues from it, refusing one written by a different `fingerprint`.
  The result's status is then "preempted" (SLURM's SIGUSR2, handed over to submitit to requeue) or
  "interrupted" (SIGTERM, the first Ctrl-C): the stage calls `result.raise_if_interrupted()`, which raises
  errors.Interrupted (exit 143/130). A second Ctrl-C ends the process at once (exit 130), naming the last saved state.
- Progress: on a terminal an in-place bar; in a log a line every 10% (and at least every minute) with the
  mean loss since the previous line, the learning rate, the rate and the ETA (runtime.ProgressBar).
- `eval_fn(model) -> dict of metrics` runs every `train.eval_every` steps on every process (the model
  is unwrapped and in eval mode); `checkpointer` (train.checkpoints.Checkpointer) saves trajectories
  (deferred writes in its background writer, flushed before each full-state save and at the end);
  `best` (train.checkpoints.BestCheckpoint) gets every evaluation's metrics and keeps the best adapter;
  `on_step(step)` runs after every optimizer step.
- History rows (one per logged step): `loss` (that step's), `loss_interval` (the mean loss over every micro-batch
  since the previous row: the interval's loss sums over its loss units), `cpu_s` (process CPU seconds over the
  interval, all threads: above the wall time when several cores worked), lr, grad_norm, the rates, eval_*.
- Tracker metrics: train/{loss, loss_interval, cpu_s, lr, grad_norm, units_per_s, samples_per_s, tokens_per_s,
  memory_mb}, eval/*.
  The tracker's run id (`tracker.run_id`, when it has one) is saved in the state, so a resumed run continues it.
Only the main process writes files and logs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from loragen import runtime
from loragen.errors import ConfigError, Interrupted, LoragenError
from loragen.fingerprint import TRAJECTORY_NEUTRAL, strip
from loragen.tracking import NullTracker
from loragen.train import state as st
from loragen.train.batches import StepBatches
from loragen.train.checkpoints import BestCheckpoint, Checkpointer
from loragen.train.preemption import PreemptionFlag, signal_name
from loragen.train.prefetch import BatchPrefetcher
from loragen.train.schedule import make_scheduler

log = logging.getLogger(__name__)
LossFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, "int | torch.Tensor"]]
RESUME = ("auto", "never")


class TrainingDiverged(LoragenError):
    """The loss or the gradient norm became NaN/inf."""


@dataclass
class FitResult:
    step: int  # optimizer steps done
    status: str  # completed | preempted (SLURM requeues the job) | interrupted (SIGTERM/SIGINT: the stage stops)
    history: list[dict] = field(default_factory=list)  # one row per logged step
    resumed_from: int | None = None
    message: str | None = None  # interrupted: the one line for the user
    exit_code: int | None = None  # interrupted: 128 + the signal number

    @property
    def last_loss(self) -> float | None:
        return self.history[-1]["loss"] if self.history else None

    def raise_if_interrupted(self) -> None:
        """Raise errors.Interrupted (the CLI prints its one line and exits 143/130) when a signal stopped the run."""
        if self.status == "interrupted":
            raise Interrupted(self.message or f"interrupted at step {self.step}", exit_code=self.exit_code or 143)


def fit(model: torch.nn.Module, loss_fn: LossFn, items: Sequence, collate: Callable[[list], Any], train_cfg: DictConfig,
        *, accelerator, state_dir: str | Path, fingerprint: dict | None = None, tracker=None,
        eval_fn: Callable[[torch.nn.Module], dict] | None = None, checkpointer: Checkpointer | None = None,
        data_name: str = "the training data", on_step: Callable[[int], None] | None = None,
        best: BestCheckpoint | None = None) -> FitResult:
    """Train `model` for train_cfg.max_steps optimizer steps (see the module docstring)."""
    tc = train_cfg
    acc = accelerator
    state_dir = Path(state_dir)
    resume = str(tc.resume)
    if resume not in RESUME:
        raise ConfigError(f"train.resume={resume!r}; expected one of {RESUME}")
    batches = StepBatches(len(items), per_device_batch=int(tc.per_device_batch), world_size=acc.num_processes,
                          grad_accum=int(tc.grad_accum), seed=int(tc.seed), what=data_name)
    fingerprint = {**(fingerprint or {}), "train": _train_fingerprint(tc), "global_batch": batches.global_batch}
    torch.manual_seed(int(tc.seed) + acc.process_index)

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters")
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params) or None  # as Trainer's
    optimizer = torch.optim.AdamW(params, lr=float(tc.lr), weight_decay=float(tc.weight_decay),
                                  betas=tuple(tc.betas), eps=float(tc.eps), fused=fused)
    scheduler = make_scheduler(optimizer, warmup_steps=int(tc.warmup_steps), max_steps=int(tc.max_steps),
                               schedule=str(tc.schedule), min_lr_ratio=float(tc.min_lr_ratio))

    start, history, resumed_from = 0, [], None
    if resume == "auto" and st.exists(state_dir):
        trainer = st.read_trainer(state_dir)
        st.check_fingerprint(state_dir, trainer["fingerprint"], fingerprint)
        rng = st.load_state(state_dir, model=model, optimizer=optimizer, scheduler=scheduler)
        if len(rng) == acc.num_processes:
            torch.set_rng_state(rng[acc.process_index])
        start, history, resumed_from = int(trainer["step"]), trainer.get("history", []), int(trainer["step"])
        if acc.is_main_process:
            log.info("resuming from %s at step %d of %d", state_dir, start, tc.max_steps)
    if checkpointer is not None:
        checkpointer.resume_at(start)
    if best is not None:
        if eval_fn is None or int(tc.eval_every) <= 0:
            raise ConfigError("ckpt.best_metric needs periodic evaluations: set train.eval_every > 0")
        best.resume_at(start)

    tracker = tracker or NullTracker()
    saved = {"step": start if resumed_from is not None else None}

    def save_full_state(step: int) -> None:
        if checkpointer is not None:  # a resumed run must find every checkpoint up to its state step
            checkpointer.flush()
        rng = _gather_objects(acc, torch.get_rng_state())
        if acc.is_main_process:
            trainer = {"step": step, "fingerprint": fingerprint, "history": history, "world_size": acc.num_processes}
            if getattr(tracker, "run_id", None):
                trainer["tracker_run_id"] = tracker.run_id  # make_tracker continues this run on resume
            st.save_state(state_dir, model=model, optimizer=optimizer, scheduler=scheduler, rng_states=rng,
                          trainer=trainer)
        acc.wait_for_everyone()
        saved["step"] = step

    ddp_model, wrapped_optimizer = acc.prepare(model, optimizer)  # the scheduler steps once per update: ours
    max_steps, status = int(tc.max_steps), "completed"
    if start >= max_steps:
        return FitResult(start, status, history, resumed_from)

    ddp_model.train()
    t_last, units_since, samples_since, tokens_since = time.perf_counter(), 0.0, 0.0, 0.0
    cpu_last, loss_since = time.process_time(), 0.0  # process CPU seconds; loss sums over the interval
    prefetch = BatchPrefetcher(items, collate, batches, rank=acc.process_index, max_steps=max_steps)
    bar = runtime.ProgressBar(max_steps, desc="train", initial=start)

    def stopped_at_once() -> str:  # the line of a second Ctrl-C (train.preemption)
        last = (f"the last saved state is step {saved['step']} in {state_dir}" if saved["step"] is not None
                else "no state was saved yet")
        return (f"stopped at once by a second Ctrl-C at step {bar.done} of {max_steps}; {last}; rerun the same "
                "command to resume from it")

    with bar, checkpointer or contextlib.nullcontext(), PreemptionFlag(on_stop_now=stopped_at_once) as preempt, \
            prefetch:  # all finish on exit
        for step in range(start, max_steps):
            totals = _one_step(ddp_model, loss_fn, prefetch, batches, step, acc, preempt.requested)
            loss_sum, units, samples, tokens, stop_flag = totals.tolist()
            done = step + 1
            if units <= 0:
                raise LoragenError(f"step {done}: the batch has no loss units (no answer tokens?)")
            loss = loss_sum / units
            grad_norm = _finish_grads(params, acc, scale=acc.num_processes / units, max_norm=float(tc.max_grad_norm))
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                if checkpointer is not None:
                    checkpointer.flush()
                last = checkpointer.last if checkpointer is not None else None
                raise TrainingDiverged(
                    f"training diverged at step {done}: loss {loss}, grad norm {grad_norm}; stopped before the update. "
                    f"Last good checkpoint: {last or 'none'}; last full state: "
                    f"{state_dir if st.exists(state_dir) else 'none'}. Lower train.lr or check the data"
                )
            lr = scheduler.get_last_lr()[0]
            wrapped_optimizer.step()
            scheduler.step()
            wrapped_optimizer.zero_grad(set_to_none=True)
            bar.update(1, loss=loss, lr=lr)
            units_since, samples_since, tokens_since = units_since + units, samples_since + samples, tokens_since + tokens
            loss_since += loss_sum

            row: dict[str, float] = {"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm}
            evaluated = eval_fn is not None and int(tc.eval_every) > 0 and done % int(tc.eval_every) == 0
            if evaluated:
                row.update(_evaluate(eval_fn, ddp_model, acc))
            if done % int(tc.log_every) == 0 or done == max_steps or evaluated:  # never drop an evaluation
                dt = max(time.perf_counter() - t_last, 1e-9)
                cpu_now = time.process_time()
                row.update(loss_interval=loss_since / units_since, cpu_s=cpu_now - cpu_last,
                           units_per_s=units_since / dt, samples_per_s=samples_since / dt, memory_mb=_memory_mb(acc.device))
                if tokens_since:
                    row["tokens_per_s"] = tokens_since / dt
                t_last, units_since, samples_since, tokens_since = time.perf_counter(), 0.0, 0.0, 0.0
                cpu_last, loss_since = cpu_now, 0.0
                history.append(row)
                tracker.log({(k.replace("eval_", "eval/") if k.startswith("eval_") else f"train/{k}"): v
                             for k, v in row.items() if k != "step"}, step=done)
            if evaluated and best is not None:
                best.update(done, row)
            if checkpointer is not None and checkpointer.due(done):
                checkpointer.save(done, {k: row[k] for k in row if k != "step"})
            if on_step is not None:
                on_step(done)
            if (stop_flag > 0) if acc.num_processes > 1 else preempt.requested:
                save_full_state(done)
                if preempt.requested and not preempt.requeue:  # SIGTERM, Ctrl-C: the stage stops, exit 143/130
                    if acc.is_main_process:
                        log.warning("full state saved at step %d in %s", done, state_dir)
                    message = (f"interrupted at step {done} of {max_steps} ({signal_name(preempt.signum)}); state "
                               f"saved in {state_dir}; rerun the same command to resume")
                    return FitResult(done, "interrupted", history, resumed_from, message=message,
                                     exit_code=preempt.exit_code)
                if acc.is_main_process:
                    log.warning("preempted: full state saved at step %d in %s; run again with the same "
                                "hydra.run.dir to resume", done, state_dir)
                preempt.hand_over()  # submitit's handler requeues the job (SLURM)
                return FitResult(done, "preempted", history, resumed_from)
            if int(tc.save_state_every) > 0 and done % int(tc.save_state_every) == 0 and done < max_steps:
                save_full_state(done)
    save_full_state(max_steps)
    return FitResult(max_steps, status, history, resumed_from)


def _one_step(model, loss_fn, prefetch: BatchPrefetcher, batches: StepBatches, step: int, acc,
              flagged: bool) -> torch.Tensor:
    """Forward/backward every micro-batch of this process; return the global [loss sum, units, samples, tokens, stop]."""
    local = torch.zeros(5, dtype=torch.float64)
    for micro in range(batches.grad_accum):
        batch = prefetch.get(step, micro)  # and the next one starts building
        sync = contextlib.nullcontext() if micro == batches.grad_accum - 1 else acc.no_sync(model)
        with sync:
            with acc.autocast():
                loss_sum, units = loss_fn(model, batch)
            acc.backward(loss_sum)
        local[0] += float(loss_sum.detach().float())
        local[1] += float(units)
        local[2] += batches.per_device_batch
        local[3] += float(batch.get("num_tokens", 0)) if isinstance(batch, dict) else 0.0
    prefetch.settle()  # nothing builds batches during the rest of the step
    local[4] = float(flagged)
    if acc.num_processes > 1:
        local = acc.reduce(local.to(acc.device), reduction="sum").cpu()
    return local


def _finish_grads(params: list[torch.nn.Parameter], acc, *, scale: float, max_norm: float) -> float:
    """Unscale (fp16), normalise the summed gradients by the global unit count, clip; return the norm before clipping."""
    acc.unscale_gradients()
    grads = [p.grad for p in params if p.grad is not None]
    torch._foreach_mul_(grads, scale)
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def _evaluate(eval_fn, ddp_model, acc) -> dict[str, float]:
    model = acc.unwrap_model(ddp_model)
    model.eval()
    try:
        with torch.no_grad():
            return dict(eval_fn(model))
    finally:
        ddp_model.train()


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS (Linux: KiB)


def _gather_objects(acc, obj: Any) -> list:
    if acc.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


def _train_fingerprint(tc: DictConfig) -> dict:
    """The train keys that change the trajectory (not resume, logging, eval or state-saving cadence)."""
    return strip(OmegaConf.to_container(tc, resolve=True), TRAJECTORY_NEUTRAL, prefix="train")
