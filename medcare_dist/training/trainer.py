"""The training loop shared by both stages.

The frozen base runs under a DeepSpeed ZeRO-3 engine (partitioned weights, gathered
layer by layer in forward and backward). The adapters are outside the engine (see
`adapter_set`): a torch AdamW updates them after their gradients are summed over ranks,
bucket by bucket while the last backward of the step runs (`grad_buckets`).

Exactness by construction:
- each rank divides its summed token loss by the label-token count of the *global* batch,
  so the summed gradient equals the single-process gradient at any world size;
- a global batch is cut into micro-batches that do not depend on the world size
  (`batching.split_global_batch`: fixed-size runs, or token-budget packs), rank r runs pieces
  r, r + W, ..., and a rank with fewer pieces runs an empty, zero-weight one;
- the RNG (LoRA dropout) is reseeded for every micro-batch from (seed, step, piece
  number), so a resumed run replays the same randomness without saving RNG state, on any
  number of ranks;
- batches come from a seeded plan (`batching.plan_global_batches`), so the data position is
  just (epoch, batch index).

Every save and every stop happens at a step boundary that all ranks agree on (a stop signal
on one rank, `save_every_minutes` on one rank's clock: `preemption.agree`), so a stopped run
leaves a checkpoint of the step reached and resumes to the same bits as an unstopped one.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from medcare_dist.dist import process_group as dist_utils
from medcare_dist.adapters.adapter_set import AdapterSet
from medcare_dist.artefacts.manifest import adapter_digest, data_fingerprint
from medcare_dist.artefacts.checkpoint import TrainState, checkpoint_bytes, clear_previous_run, load_checkpoint, require_room, save_checkpoint
from medcare_dist.artefacts.run_lock import require_held
from medcare_dist.config import ConfigError, TrainConfig
from medcare_dist.data.batching import collate, collate_packed, pieces_for_rank, plan_global_batches, row_tokens, split_global_batch
from medcare_dist.data.chat import IGNORE_INDEX
from medcare_dist.errors import DataError
from medcare_dist.dist.grad_buckets import GradientBuckets
from medcare_dist.dist.preemption import EXIT_PREEMPTED, StopRequests, agree
from medcare_dist.dist.rank_env import World
from medcare_dist.training.lm_loss import model_lm_loss_sum
from medcare_dist.training.zero3 import base_checksum
from medcare_dist.method.objective import Objective
from medcare_dist.resources import read_ds_config
from medcare_dist.training.metrics import MetricsReporter, warn
from medcare_dist.training.resume import agreed_resume_checkpoint, check_resumable


@dataclass
class StepResult:
    losses: dict[str, float]
    grad_norm: float
    tokens: int


def micro_batch_seed(seed: int, step: int, piece: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{step}:{piece}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def grad_scaler(cfg: TrainConfig, device: torch.device) -> "torch.amp.GradScaler":
    """Dynamic loss scaling for fp16 (a no-op scaler otherwise). The loss is divided by the
    global token count before backward, so unscaled fp16 gradients underflow through the base's
    fp16 activations. Settings come from the DeepSpeed config's fp16 section, as DeepSpeed
    names them: initial_scale_power (default 16) and loss_scale_window (steps without
    overflow before the scale doubles, default 1000); an overflow skips the optimizer step and
    halves the scale."""
    enabled = cfg.dtype == "fp16"
    fp16 = read_ds_config(cfg.ds_config).get("fp16", {}) if enabled else {}
    if enabled and fp16.get("loss_scale", 0) not in (0, "auto"):
        raise ConfigError(f"{cfg.ds_config}: fp16.loss_scale {fp16['loss_scale']} (static) is not supported: remove it for dynamic loss scaling")
    return torch.amp.GradScaler(
        device.type, init_scale=2.0 ** fp16.get("initial_scale_power", 16), growth_interval=int(fp16.get("loss_scale_window", 1000)),
        enabled=enabled,
    )


def optimizer_step(params, optimizer, scaler, max_grad_norm: float) -> tuple[torch.Tensor, bool]:
    """Unscale (fp16), clip and apply the summed gradients, then clear them. Returns the
    gradient norm and whether the step was skipped for an overflow (the scale then halves).
    The gradients are already summed over ranks, so every rank makes the same decision."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    scale = scaler.get_scale()
    scaler.step(optimizer)  # skipped when a gradient is inf or nan
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, scaler.get_scale() < scale


def packing_is_exact(model, adapters) -> bool:
    """Does this model, with its attention implementation, keep packed records apart? Two
    short sequences packed in one row (position_ids restarting) must give the logits each
    gives alone. Dropout off; every rank runs the same three forwards (ZeRO-3)."""
    device = next(adapters.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (12,), generator=torch.Generator().manual_seed(0)).to(device)
    first, second = ids[:7], ids[7:]
    was_training = model.training, adapters.training
    model.eval(), adapters.eval()
    try:
        with torch.no_grad():
            alone = torch.cat([model(input_ids=x[None]).logits[0] for x in (first, second)])
            positions = torch.cat([torch.arange(len(first)), torch.arange(len(second))]).to(device)
            packed = model(input_ids=ids[None], position_ids=positions[None]).logits[0]
    except TypeError:  # a model whose forward takes no position_ids
        return False
    finally:
        model.train(was_training[0]), adapters.train(was_training[1])
    tolerance = 1e-4 if alone.dtype == torch.float32 else 3e-2  # relative to the logits' scale; bf16/fp16 round more
    error = float((packed.float() - alone.float()).abs().max())
    return error <= tolerance * max(float(alone.float().abs().max()), 1.0)


def total_steps(cfg: TrainConfig, num_records: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * math.ceil(num_records / cfg.global_batch_size)))


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        world: World,
        engine,
        adapters: AdapterSet,
        dataset,
        objective: Objective,
        pad_token_id: int,
        manifest: dict,
        log: Callable[[str], None] = print,
    ):
        self.cfg, self.world, self.engine, self.adapters = cfg, world, engine, adapters
        self.model = engine.module  # forward the module directly: the engine's wrapper expects a DeepSpeed optimizer
        self.dataset, self.objective, self.pad_token_id = dataset, objective, pad_token_id
        self.manifest, self.log = manifest, log
        self.out_dir = Path(cfg.output_dir)
        self.params = adapters.trainable_parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.grad_sync = GradientBuckets(adapters.trainable_by_depth(self.model), cfg.grad_bucket_mb,
                                         dist_utils.gradient_group(cfg.timeout_minutes))
        self.num_steps = total_steps(cfg, len(dataset))
        self.scheduler = self._schedule(last_step=0)
        self.scaler = grad_scaler(cfg, world.device)
        self.lengths = dataset["length"]
        self.label_tokens = dataset["num_label_tokens"]
        self.manifest = manifest | {"data_fingerprint": data_fingerprint(self.lengths, self.label_tokens), "num_records": len(dataset)}
        self.pack_tokens = self._packing_budget()
        self.state = TrainState(world_size=world.world_size)
        # metrics.jsonl, plus TensorBoard when cfg.report_to asks (checked here, at startup, on every rank)
        self.reporter = MetricsReporter(self.out_dir, cfg.report_to, enabled=world.is_main)
        self.stop_reason: str | None = None  # set when fit() stopped early on a stop request
        self._last_save_at, self._saved_step = time.monotonic(), -1

    # --- resume ---------------------------------------------------------------------

    def _schedule(self, last_step: int):
        """The lr schedule (and weight decay) of this run's config, positioned after `last_step`
        optimizer steps. Rebuilt, not restored, on resume: a changed lr, warmup or length takes
        effect, and an unchanged one gives the very lr the checkpointed run would have used."""
        from transformers import get_cosine_schedule_with_warmup

        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.cfg.lr
            group["weight_decay"] = self.cfg.weight_decay
        return get_cosine_schedule_with_warmup(
            self.optimizer, num_warmup_steps=math.ceil(self.cfg.warmup_ratio * self.num_steps), num_training_steps=self.num_steps,
            last_epoch=last_step - 1,
        )

    def maybe_resume(self) -> None:
        if not self.cfg.resume:
            return
        path = agreed_resume_checkpoint(self.out_dir, self.cfg.resume, log=self.log)
        if path is None:
            self.log(f"--resume {self.cfg.resume}: no complete checkpoint in {self.out_dir}, starting from step 0")
            self._rewind_metrics(0)
            return
        ckpt = load_checkpoint(path)
        check_resumable(path, ckpt["config"], ckpt["manifest"], self.cfg, self.manifest, self.log)
        self.adapters.load_flat_state_dict(ckpt["adapters"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        saved_world = ckpt["state"].world_size
        self.state = ckpt["state"]
        self.state.world_size = self.world.world_size
        self.scheduler = self._schedule(last_step=self.state.step)
        if self.scaler.is_enabled() and self.state.grad_scaler:
            self.scaler.load_state_dict(self.state.grad_scaler)
        self._rewind_metrics(self.state.step)
        self.log(f"resumed from {path} at step {self.state.step} (saved by {saved_world} rank(s), now {self.world.world_size})")

    def _rewind_metrics(self, step: int) -> None:
        dropped = self.reporter.rewind(step)
        if dropped:
            self.log(f"metrics.jsonl: dropped {dropped} record(s) past step {step}, logged by the run that is resumed or replaced")

    # --- one optimizer step ------------------------------------------------------------

    def _packing_budget(self) -> int:
        """Tokens per packed row, or 0 for padded micro-batches.

        auto packs only under a varlen attention (flash_attention_*): sdpa and eager compute a
        packed row's masked blocks too, and measured on CPU that is slower than padding the
        length-grouped batches (docs/benchmarks.md). Packing is used only where a probe shows
        that the model keeps packed records apart; `on` refuses a model where it does not."""
        cfg = self.cfg
        attn = getattr(self.model.config, "_attn_implementation", None) or "?"
        if cfg.packing == "off":
            return 0
        if cfg.packing == "auto" and not attn.startswith("flash_attention"):
            self.log(f"packing off (auto): attention {attn!r} would compute the masked part of packed rows; --packing on packs anyway")
            return 0
        if not packing_is_exact(self.model, self.adapters):
            reason = f"{type(self.model).__name__} with attention {attn!r} lets packed records attend to each other"
            if cfg.packing == "on":
                raise ConfigError(f"packing on: {reason}; use --packing off (or auto)")
            self.log(f"packing off: {reason}; micro-batches are padded")
            return 0
        return row_tokens(cfg.max_length, cfg.pack_tokens)

    def _micro_batch(self, piece: list[list[int]]) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """(model inputs, labels, token mask [tokens]: real tokens, False for padding)."""
        if piece:
            rows, real = [[self.dataset[i] for i in row] for row in piece], True
        else:  # this rank has no piece left in the batch: a zero-weight forward keeps ZeRO-3 in step
            rows, real = [[{"input_ids": [self.pad_token_id] * 2, "labels": [IGNORE_INDEX] * 2}]], False
        if self.pack_tokens:
            batch = collate_packed(rows, self.pad_token_id)
            not_pad = batch.pop("real_tokens").reshape(-1)
        else:
            batch = collate([record for row in rows for record in row], self.pad_token_id)
            not_pad = batch["attention_mask"].bool().reshape(-1)
        token_mask = not_pad if real else torch.zeros_like(not_pad)
        batch = {k: v.to(self.world.device) for k, v in batch.items()}
        labels = batch.pop("labels")
        return batch, labels, token_mask.to(self.world.device)

    def compute_gradients(self, global_batch: list[int]) -> tuple[dict[str, float], int]:
        """Forward and backward of this rank's share of `global_batch`; the adapter gradients
        are summed over ranks during the last backward. Returns this rank's loss parts and
        token count."""
        cfg, world = self.cfg, self.world
        global_label_tokens = max(1, sum(self.label_tokens[i] for i in global_batch))
        parts: dict[str, float] = {}
        tokens = 0
        pieces = pieces_for_rank(split_global_batch(global_batch, self.lengths, cfg.micro_batch_size, self.pack_tokens),
                                 world.world_size, world.rank)  # as many on every rank
        for step_number, (number, piece) in enumerate(pieces):
            # Piece k of the global batch holds the same records at any world size
            # (batching.split_global_batch); seeding from k gives the same dropout masks too.
            torch.manual_seed(micro_batch_seed(cfg.seed, self.state.step, number))
            inputs, labels, token_mask = self._micro_batch(piece)
            lm = model_lm_loss_sum(self.model, inputs, labels, cfg.lm_loss, cfg.loss_chunk_tokens) / global_label_tokens
            share = (labels[:, 1:] != IGNORE_INDEX).sum().item() / global_label_tokens
            terms = {"lm": lm} | {k: v * share for k, v in self.objective.batch_losses(token_mask).items()}
            for k, v in terms.items():
                parts[k] = parts.get(k, 0.0) + float(v.detach())
            loss = sum(terms.values())
            if step_number == len(pieces) - 1:
                # The weight-only terms join the last backward, so that every gradient is final
                # when its hook fires there; every rank adds 1/world: their summed gradient counts once.
                step_terms = {k: v / world.world_size for k, v in self.objective.step_losses().items()}
                parts.update({k: float(v.detach()) for k, v in step_terms.items()})
                loss = loss + sum(step_terms.values())
                self.grad_sync.arm()
            self.scaler.scale(loss).backward()  # scaled for fp16 only (grad_scaler)
            self.engine.optimizer.partition_all_parameters()  # what ZeRO-3's own optimizer does after backward
            tokens += int(token_mask.sum())
        self.grad_sync.finish()
        return parts, tokens

    def train_step(self, global_batch: list[int]) -> StepResult:
        parts, tokens = self.compute_gradients(global_batch)
        grad_norm, skipped = optimizer_step(self.params, self.optimizer, self.scaler, self.cfg.max_grad_norm)
        if skipped:
            self.log(f"step {self.state.step + 1}: fp16 gradient overflow: step skipped, loss scale now {self.scaler.get_scale():g}")
        self.scheduler.step()  # in step with the step count, skipped or not: the schedule is a function of the step
        names = sorted(parts)
        summed = dist_utils.all_reduce_sum([parts[k] for k in names] + [tokens])
        return StepResult(losses=dict(zip(names, summed[:-1])), grad_norm=float(grad_norm), tokens=int(summed[-1]))

    # --- the loop ------------------------------------------------------------------------

    def _log_metrics(self, record: dict) -> None:
        notices = self.objective.notices()
        if not self.world.is_main:
            return
        for notice in notices:
            warn(notice)
        self.reporter.write(record)  # metrics.jsonl (+ TensorBoard): metrics.MetricsReporter
        losses = " ".join(f"{k}={v:.4f}" for k, v in record.items() if k.startswith("loss"))
        self.log(
            f"step {record['step']}/{self.num_steps} {losses} lr={record['lr']:.2e} "
            f"grad_norm={record['grad_norm']:.3f} tokens/s={record['tokens_per_s']:.0f}"
        )

    def _check_ranks_agree(self) -> dict:
        """Adapters are replicated: every rank must hold bit-identical weights. A mismatch
        means a gradient was not synchronised, and is an error, not a warning."""
        digests = dist_utils.gather_objects(adapter_digest(self.adapters.flat_state_dict()))
        if len(set(digests)) != 1:
            raise RuntimeError(f"adapter weights differ across ranks at step {self.state.step}: {digests}")
        return {"adapter_sha256": digests[0], "ranks_agreeing": len(digests), "base_checksum": base_checksum(self.model)}

    def save(self) -> Path | None:
        path = None
        checks = self._check_ranks_agree()
        if checks["base_checksum"] != self.manifest["base_checksum"]:
            raise RuntimeError(f"the frozen base changed during training: checksum {checks['base_checksum']} != {self.manifest['base_checksum']}")
        self.state.grad_scaler = self.scaler.state_dict()
        if self.world.is_main:
            require_held()  # a run whose output_dir was taken over stops here, before it writes over the new holder
            path = save_checkpoint(
                self.out_dir,
                self.state,
                self.adapters.flat_state_dict(),
                self.optimizer.state_dict(),
                self.cfg.to_dict(),
                self.manifest | checks,
                keep_last=self.cfg.keep_last,
            )
            self.log(f"saved {path}")
        dist_utils.barrier()
        self._last_save_at, self._saved_step = time.monotonic(), self.state.step
        return path

    def _save_or_stop(self, stop: StopRequests | None) -> bool:
        """At a step boundary: save by steps, by wall clock or on a stop request, the last two
        agreed by all ranks (`preemption.agree`). True when the run must stop now."""
        cfg, step = self.cfg, self.state.step
        if step >= self.num_steps:
            return False  # fit() saves the final step
        if cfg.save_every and step % cfg.save_every == 0:
            self.save()
        timed = cfg.save_every_minutes > 0 and time.monotonic() - self._last_save_at >= cfg.save_every_minutes * 60
        stopping, timed = agree(stop is not None and stop.reason is not None, timed)
        if (stopping or timed) and self._saved_step != step:
            self.save()
        if stopping:
            self.stop_reason = why = (stop.reason if stop is not None else None) or "a stop request on another rank"
            self.log(f"stopped at step {step}/{self.num_steps} ({why}): checkpoint-{step} saved; "
                     f"exit status {EXIT_PREEMPTED}; --resume auto continues")
        return stopping

    def fit(self, stop: StopRequests | None = None) -> TrainState:
        """Train to the end, or until `stop` (stop signals, a lost launcher) asks: then the
        step reached is saved and `stop_reason` says why."""
        from tqdm import tqdm

        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if cfg.overwrite and self.world.is_main:
            removed = clear_previous_run(self.out_dir)
            if removed:
                self.log(f"--overwrite: deleted the earlier run's {', '.join(removed)} from {self.out_dir}")
        dist_utils.barrier()
        if self.world.is_main:  # a full disk found now, not after hours of training (the AdamW moments: two per weight)
            flat = self.adapters.flat_state_dict()
            require_room(self.out_dir, "a checkpoint", checkpoint_bytes(flat, {"exp_avg": flat, "exp_avg_sq": flat}))
        self.maybe_resume()
        self._last_save_at, self._saved_step = time.monotonic(), self.state.step
        bar = tqdm(total=self.num_steps, initial=self.state.step, disable=not self.world.is_main, desc=f"stage {cfg.stage}", dynamic_ncols=True)
        window_tokens, window_start = 0, time.perf_counter()
        while self.state.step < self.num_steps:
            batches = plan_global_batches(self.lengths, cfg.global_batch_size, cfg.seed, self.state.epoch)
            if not batches:  # never spin through empty epochs
                raise DataError(f"epoch {self.state.epoch} has no batch: the dataset has no records")
            while self.state.batch_in_epoch < len(batches) and self.state.step < self.num_steps:
                result = self.train_step(batches[self.state.batch_in_epoch])
                self.state.step += 1
                self.state.batch_in_epoch += 1
                window_tokens += result.tokens
                bar.update(1)
                bar.set_postfix(loss=f"{sum(result.losses.values()):.4f}")
                if self.state.step % cfg.log_every == 0 or self.state.step == self.num_steps:
                    elapsed = time.perf_counter() - window_start
                    record = {
                        "step": self.state.step,
                        "epoch": self.state.epoch,
                        "loss": sum(result.losses.values()),
                        **{f"loss_{k}": v for k, v in result.losses.items()},
                        "lr": self.scheduler.get_last_lr()[0],
                        "grad_norm": result.grad_norm,
                        "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                        **({"loss_scale": self.scaler.get_scale()} if self.scaler.is_enabled() else {}),
                        **self.objective.metrics(dist_utils.all_reduce_sum),
                    }
                    self._log_metrics(record)
                    window_tokens, window_start = 0, time.perf_counter()
                if self._save_or_stop(stop):
                    bar.close()
                    return self.state
            if self.state.batch_in_epoch >= len(batches):
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
        bar.close()
        self.save()
        return self.state
