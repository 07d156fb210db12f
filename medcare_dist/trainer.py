"""The training loop shared by both stages.

The frozen base runs under a DeepSpeed ZeRO-3 engine (partitioned weights, gathered
layer by layer in forward and backward). The adapters are outside the engine (see
`adapter_set`): a torch AdamW updates them after their gradients are summed over ranks.

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
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import distributed as dist_utils
from .adapter_set import AdapterSet
from .artefacts import adapter_digest
from .checkpoint import CheckpointError, TrainState, find_resume_checkpoint, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig
from .batching import collate, collate_packed, pieces_for_rank, plan_global_batches, split_global_batch
from .data import IGNORE_INDEX, DataError
from .launchers import World
from .losses import model_lm_loss_sum
from .model import base_checksum, trainable_parameters
from .reporting import MetricsReporter


class Objective:
    """Stage-specific loss terms and metrics. The default adds nothing."""

    def batch_losses(self, token_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Terms that depend on the micro-batch just forwarded (weighted by its share of tokens)."""
        return {}

    def step_losses(self) -> dict[str, torch.Tensor]:
        """Terms that depend only on adapter weights: computed once per optimizer step."""
        return {}

    def metrics(self) -> dict:
        """Extra values for the log line; called on every rank at log time."""
        return {}


@dataclass
class StepResult:
    losses: dict[str, float]
    grad_norm: float
    tokens: int


def micro_batch_seed(seed: int, step: int, piece: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{step}:{piece}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


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
        self.params = trainable_parameters(adapters)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.num_steps = total_steps(cfg, len(dataset))
        from transformers import get_cosine_schedule_with_warmup

        self.scheduler = get_cosine_schedule_with_warmup(
            self.optimizer, num_warmup_steps=math.ceil(cfg.warmup_ratio * self.num_steps), num_training_steps=self.num_steps
        )
        self.lengths = dataset["length"]
        self.label_tokens = dataset["num_label_tokens"]
        self.pack_tokens = self._packing_budget()
        self.state = TrainState(world_size=world.world_size)
        # metrics.jsonl, plus TensorBoard when cfg.report_to asks (checked here, at startup, on every rank)
        self.reporter = MetricsReporter(self.out_dir, cfg.report_to, enabled=world.is_main)

    # --- resume ---------------------------------------------------------------------

    def maybe_resume(self) -> None:
        path = find_resume_checkpoint(self.out_dir, self.cfg.resume)
        if path is None:
            if self.cfg.resume:
                self.log(f"--resume {self.cfg.resume}: no complete checkpoint in {self.out_dir}, starting from step 0")
            return
        ckpt = load_checkpoint(path)
        for key in ("stage", "base_fingerprint"):
            if ckpt["manifest"].get(key) != self.manifest[key]:
                raise CheckpointError(
                    f"cannot resume from {path}: its {key} is {ckpt['manifest'].get(key)!r}, this run's is {self.manifest[key]!r}"
                )
        self.adapters.load_flat_state_dict(ckpt["adapters"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        saved_world = ckpt["state"].world_size
        self.state = ckpt["state"]
        self.state.world_size = self.world.world_size
        self.log(f"resumed from {path} at step {self.state.step} (saved by {saved_world} rank(s), now {self.world.world_size})")

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
        return cfg.pack_tokens or cfg.max_length

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
        """Forward and backward of this rank's share of `global_batch`, then the adapter
        gradients summed over ranks. Returns this rank's loss parts and token count."""
        cfg, world = self.cfg, self.world
        global_label_tokens = max(1, sum(self.label_tokens[i] for i in global_batch))
        parts: dict[str, float] = {}
        tokens = 0
        pieces = split_global_batch(global_batch, self.lengths, cfg.micro_batch_size, self.pack_tokens)
        for number, piece in pieces_for_rank(pieces, world.world_size, world.rank):
            # Piece k of the global batch holds the same records at any world size
            # (batching.split_global_batch); seeding from k gives the same dropout masks too.
            torch.manual_seed(micro_batch_seed(cfg.seed, self.state.step, number))
            inputs, labels, token_mask = self._micro_batch(piece)
            lm = model_lm_loss_sum(self.model, inputs, labels, cfg.lm_loss, cfg.loss_chunk_tokens) / global_label_tokens
            share = (labels[:, 1:] != IGNORE_INDEX).sum().item() / global_label_tokens
            terms = {"lm": lm} | {k: v * share for k, v in self.objective.batch_losses(token_mask).items()}
            sum(terms.values()).backward()
            self.engine.optimizer.partition_all_parameters()  # what ZeRO-3's own optimizer does after backward
            tokens += int(token_mask.sum())
            for k, v in terms.items():
                parts[k] = parts.get(k, 0.0) + float(v.detach())
        # Every rank adds 1/world of the weight-only terms: their summed gradient counts once.
        step_terms = {k: v / world.world_size for k, v in self.objective.step_losses().items()}
        if step_terms:
            sum(step_terms.values()).backward()
            parts.update({k: float(v.detach()) for k, v in step_terms.items()})
        dist_utils.sum_gradients(self.params)
        return parts, tokens

    def train_step(self, global_batch: list[int]) -> StepResult:
        parts, tokens = self.compute_gradients(global_batch)
        max_norm = self.cfg.max_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm if max_norm > 0 else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        names = sorted(parts)
        summed = dist_utils.all_reduce_sum([parts[k] for k in names] + [tokens])
        return StepResult(losses=dict(zip(names, summed[:-1])), grad_norm=float(grad_norm), tokens=int(summed[-1]))

    # --- the loop ------------------------------------------------------------------------

    def _log_metrics(self, record: dict) -> None:
        if not self.world.is_main:
            return
        self.reporter.write(record)  # metrics.jsonl (+ TensorBoard): reporting.MetricsReporter
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
        if self.world.is_main:
            path = save_checkpoint(
                self.out_dir,
                self.state,
                self.adapters.flat_state_dict(),
                self.optimizer.state_dict(),
                self.scheduler.state_dict(),
                self.cfg.to_dict(),
                self.manifest | checks,
                keep_last=self.cfg.keep_last,
            )
            self.log(f"saved {path}")
        dist_utils.barrier()
        return path

    def fit(self) -> TrainState:
        from tqdm import tqdm

        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.maybe_resume()
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
                        **self.objective.metrics(),
                    }
                    self._log_metrics(record)
                    window_tokens, window_start = 0, time.perf_counter()
                if cfg.save_every and self.state.step % cfg.save_every == 0 and self.state.step < self.num_steps:
                    self.save()
            if self.state.batch_in_epoch >= len(batches):
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
        bar.close()
        self.save()
        return self.state
