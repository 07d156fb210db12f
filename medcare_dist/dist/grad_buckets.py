"""Adapter gradients summed over ranks in buckets while the last backward of a step runs, as
DDP overlaps its all-reduce with backward, instead of one flat copy of every gradient after it.

- The trainable params are cut, in the order backward is expected to finish their gradients
  (deepest adapted module first: `AdapterSet.trainable_by_depth`), into buckets of at most
  `bucket_bytes` (a larger param gets a bucket of its own).
- Each param has a post-accumulate-grad hook. Only between `arm()` and `finish()` (the last
  backward of a step; earlier micro-batches just accumulate, like DDP's no_sync) does it
  count: when every param of a bucket has its final gradient, the bucket's gradients are
  copied into one flat buffer and all-reduced asynchronously on the gradient process group.
- Buckets are launched strictly in bucket order on every rank (a ready bucket waits for the
  ones before it), so the collectives match across ranks whatever order the hooks fire in.
  A param that gets no gradient in the armed backward never fires: `finish()` launches what
  is left, in the same order, then waits for every bucket and makes each summed buffer the
  params' gradients (views into it). A param with no gradient at all contributes zeros.
- A gradient that arrives after its bucket was launched (a param reached twice in one
  backward, e.g. by reentrant checkpointing) would be lost: it is an error.

The group is a process group of its own (`distributed.gradient_group`), so these collectives
never interleave with ZeRO-3's gathers on the default group, whose order they cannot know.
Without a group (a world of one) nothing is sent; gradients are still completed with zeros.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def assign_buckets(sizes: list[int], bucket_bytes: int) -> list[list[int]]:
    """Consecutive indices into runs of at most `bucket_bytes` (sizes in bytes); an item
    larger than that is a run of its own. Order is kept."""
    buckets: list[list[int]] = []
    filled = 0
    for i, size in enumerate(sizes):
        if not buckets or filled + size > bucket_bytes:
            buckets.append([])
            filled = 0
        buckets[-1].append(i)
        filled += size
    return buckets


class GradientBuckets:
    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], bucket_mb: float, group):
        if bucket_mb <= 0:
            raise ValueError(f"bucket size must be > 0 MB, got {bucket_mb}")
        kinds = {(p.dtype, p.device) for _, p in named_params}
        if len(kinds) > 1:
            raise ValueError(f"adapter params of several dtypes/devices {sorted(map(str, kinds))}: one flat buffer per bucket needs one")
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.group = group
        sizes = [p.numel() * p.element_size() for p in self.params]
        self.buckets = assign_buckets(sizes, int(bucket_mb * 2**20))
        self._bucket_of = {i: b for b, members in enumerate(self.buckets) for i in members}
        self._armed = False
        self._reset()
        for i, p in enumerate(self.params):
            p.register_post_accumulate_grad_hook(self._hook(i))

    def _reset(self) -> None:
        self._final = [False] * len(self.params)
        self._waiting = [len(members) for members in self.buckets]  # params of each bucket still to finish
        self._launched: list[tuple[torch.Tensor | None, object]] = []  # (flat buffer, work) per launched bucket

    def arm(self) -> None:
        """Call right before the last backward of a step."""
        if self._armed:
            raise RuntimeError("GradientBuckets.arm() called twice without finish()")
        self._reset()
        self._armed = True

    def _hook(self, i: int):
        def on_grad(_param: torch.Tensor) -> None:
            if not self._armed:
                return
            bucket = self._bucket_of[i]
            if bucket < len(self._launched):
                raise RuntimeError(
                    f"gradient of {self.names[i]} arrived after its bucket was all-reduced: the param is reached twice in "
                    "one backward (reentrant activation checkpointing?); use non-reentrant checkpointing"
                )
            if not self._final[i]:
                self._final[i] = True
                self._waiting[bucket] -= 1
            self._launch_ready()

        return on_grad

    def _launch_ready(self, leftovers: bool = False) -> None:
        """Launch, in bucket order, every bucket that is complete (all of them: `leftovers`)."""
        while len(self._launched) < len(self.buckets):
            bucket = len(self._launched)
            if self._waiting[bucket] and not leftovers:
                return
            grads = [self.params[i].grad for i in self.buckets[bucket]]
            if self.group is None:
                for i, g in zip(self.buckets[bucket], grads):
                    if g is None:
                        self.params[i].grad = torch.zeros_like(self.params[i])
                self._launched.append((None, None))
                continue
            with torch.no_grad():
                flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                  for p, g in zip((self.params[i] for i in self.buckets[bucket]), grads)])
            self._launched.append((flat, dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True)))

    def finish(self) -> None:
        """After the last backward: launch what is left, wait for every bucket, and set each
        param's gradient to its summed value."""
        if not self._armed:
            raise RuntimeError("GradientBuckets.finish() without arm()")
        self._armed = False
        self._launch_ready(leftovers=True)
        for bucket, (flat, work) in enumerate(self._launched):
            if flat is None:
                continue
            work.wait()
            offset = 0
            for i in self.buckets[bucket]:
                p = self.params[i]
                p.grad = flat[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
        self._launched = []
