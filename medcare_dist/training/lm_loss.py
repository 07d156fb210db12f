"""The language-model loss of a training step (the stage-specific terms: method/).

The LM loss has two implementations with the same value and gradient:

- `causal_lm_loss_sum(logits, labels)`: from the model's full logits ([tokens, vocab] for the
  whole micro-batch; at Qwen's 151,936-entry vocabulary that is most of a step's memory);
- `model_lm_loss_sum(model, inputs, labels, chunk_tokens)`: runs the model with no logits
  at all (`logits_to_keep` empty), takes the final hidden states, keeps only the positions
  that have a label, and applies the LM head plus cross entropy `chunk_tokens` rows at a
  time (`ChunkedLinearCrossEntropy`), inside the LM head's own forward. Peak logit memory is one [chunk_tokens, vocab] fp32
  block, whatever the micro-batch size.

What a model does to its logits after the LM head (`LogitTransform`: Cohere's `logit_scale`,
Granite's `logits_scaling`, Gemma 2's `final_logit_softcapping`) is applied inside each chunk,
with its exact derivative in the gradient, and by eval's scoring on the rows it computes; the
full loss gets it from the model itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medcare_dist.config import choices
from medcare_dist.data.chat import IGNORE_INDEX
from medcare_dist.errors import ConfigError


@dataclass(frozen=True)
class LogitTransform:
    """What a model does to the LM head's output: logits * scale, then cap * tanh(logits / cap)."""

    scale: float = 1.0
    cap: float | None = None
    fields: tuple[str, ...] = ()  # the config fields it comes from

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.cap:
            logits = torch.tanh(logits / self.cap) * self.cap
        return logits


def logit_transform(config) -> LogitTransform:
    """The transform a model config (a PretrainedConfig or config.json's dict) asks for."""
    get = config.get if isinstance(config, dict) else (lambda name: getattr(config, name, None))
    values = {name: get(name) for name in ("logit_scale", "logits_scaling", "final_logit_softcapping")}
    for name, value in values.items():
        if value is not None and not (isinstance(value, (int, float)) and value > 0):
            raise ConfigError(f"the model config's {name} is {value!r}: expected a number > 0")
    fields = tuple(name for name, value in values.items()
                   if value is not None and (value != 1 or name == "final_logit_softcapping"))
    scale = float(values["logit_scale"] or 1.0) / float(values["logits_scaling"] or 1.0)
    cap = values["final_logit_softcapping"]
    return LogitTransform(scale, float(cap) if cap else None, fields)


@torch.no_grad()
def check_logits_after_head(model, device) -> None:
    """On a short input, the model's own logits must be `logit_transform` of its LM head's
    output on the decoder's last hidden states, as the chunked loss and eval's scoring compute
    them; a model that changes its logits some other way (a config field not known here) is
    refused. Every rank runs the same forwards (ZeRO-3), in eval mode (no dropout)."""
    transform = logit_transform(model.config)
    ids = torch.arange(min(8, model.config.vocab_size), device=device)[None]
    was_training = model.training
    model.eval()
    try:
        own = model(input_ids=ids).logits.float()
        ours = transform(model.get_output_embeddings()(model.get_decoder()(input_ids=ids).last_hidden_state).float())
    finally:
        model.train(was_training)
    tolerance = 1e-4 if model.dtype == torch.float32 else 3e-2  # relative to the logits' scale; bf16/fp16 round more
    if float((own - ours).abs().max()) > tolerance * max(float(own.abs().max()), 1.0):
        known = f" with {', '.join(transform.fields)}" if transform.fields else ""
        raise ConfigError(f"{type(model).__name__}'s logits are not its LM head's output{known}: it changes them "
                          "in a way medcare_dist does not know, so its losses and scores would be wrong")


def check_lm_loss(model, impl: str) -> LogitTransform:
    """The model's logit transform, or a one-line refusal naming what `impl` cannot apply (a
    config field, the LM head's bias). `model` may be weightless (meta device)."""
    transform = logit_transform(model.config)
    if impl == "liger":
        missed = [f"the model config's {name}" for name in transform.fields]
        missed += ["the LM head's bias"] if getattr(model.get_output_embeddings(), "bias", None) is not None else []
        if missed:
            raise ConfigError(f"lm_loss 'liger' does not apply {', '.join(missed)}: use lm_loss chunked or full")
    return transform


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of next-token cross entropy over the labelled positions."""
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(transform(hidden_i @ weight^T + bias), target_i), `chunk` rows at a time; weight and bias are frozen.

    The gradient with respect to `hidden` is computed in the forward, chunk by chunk
    ((softmax - onehot) @ weight), so no chunk's logits outlive its iteration and the
    backward needs neither logits nor the weight: under ZeRO-3 the LM head is gathered once,
    for the forward only. Logits, softmax and the loss are fp32 (the matmul runs in the
    weight's dtype, as the model's own LM head does). `transform` (a `LogitTransform`) is applied
    in fp32 and its derivative (scale, 1 - tanh^2) enters the gradient. Without grad mode no
    gradient is made.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                transform: LogitTransform = LogitTransform(), bias: torch.Tensor | None = None) -> torch.Tensor:
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            logits = F.linear(h.to(weight.dtype), weight, bias).float()
            if transform.scale != 1.0:
                logits.mul_(transform.scale)
            squash = None
            if transform.cap:
                squash = logits.div_(transform.cap).tanh_()
                logits = squash * transform.cap
            target_logit = logits.gather(1, t[:, None]).squeeze(1)
            top = logits.amax(dim=1, keepdim=True)
            probs = logits.sub_(top).exp_()  # in place: one [chunk, vocab] buffer per iteration
            total = probs.sum(dim=1, keepdim=True)
            loss += (total.log().squeeze(1) + top.squeeze(1) - target_logit).sum()
            if grad is not None:
                probs.div_(total)
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                if squash is not None:
                    probs.mul_(squash.square_().neg_().add_(1.0))
                if transform.scale != 1.0:
                    probs.mul_(transform.scale)
                grad[start:start + chunk] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
            del logits, probs, squash
        ctx.save_for_backward(grad if grad is not None else hidden.new_empty(0))
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None


def labelled_positions(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden rows that predict a label [N, hidden], those labels [N]): position t predicts labels[t + 1]."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return hidden[:, :-1][keep], targets[keep]


def model_lm_loss_sum(model, inputs: dict[str, torch.Tensor], labels: torch.Tensor, impl: str = "chunked",
                      chunk_tokens: int = 1024) -> torch.Tensor:
    """Sum of next-token cross entropy over the labelled positions of one micro-batch.

    impl "full": the model's own logits and `causal_lm_loss_sum`. "chunked": see
    `ChunkedLinearCrossEntropy`. "liger": Liger-Kernel's fused linear cross entropy (CUDA;
    optional dependency). Every rank must call this the same number of times: under ZeRO-3
    the LM head weight is gathered collectively, also for a micro-batch with no label.

    The chunked and fused losses are computed inside the model's own forward, in a hook on the
    LM head that runs while ZeRO-3 holds the head's weight gathered for that forward (the model
    itself computes no logits: `logits_to_keep` is empty). So the head is gathered once per
    micro-batch, by ZeRO-3's own fetch, which under hpZ stays inside the node
    (ds_configs/zero3_node_local.json); the backward needs no weight at all.
    """
    if impl == "full":
        return causal_lm_loss_sum(model(**inputs).logits, labels)
    if impl not in choices("lm_loss"):
        raise ValueError(f"lm_loss must be one of {', '.join(choices('lm_loss'))}, not {impl!r}")
    transform = check_lm_loss(model, impl)
    head = model.get_output_embeddings()
    found: dict[str, torch.Tensor] = {}

    def keep_hidden(_module, _args, out):
        found["hidden"] = out[0]

    def loss_at_head(module, _args, _out):
        hidden, targets = labelled_positions(found["hidden"], labels)
        if impl == "liger":
            found["loss"] = _liger_loss_sum(hidden, module.weight, targets)
        else:
            found["loss"] = ChunkedLinearCrossEntropy.apply(hidden, module.weight, targets, chunk_tokens, transform,
                                                            module.bias)

    handles = [model.get_decoder().register_forward_hook(keep_hidden),
               head.register_forward_hook(loss_at_head, prepend=True)]  # before ZeRO-3 releases the weight
    try:
        model(**inputs, logits_to_keep=torch.zeros(0, dtype=torch.long, device=inputs["input_ids"].device))
    finally:
        for handle in handles:
            handle.remove()
    return found["loss"]


def loss_working_bytes(impl: str, tokens: int, vocab: int, hidden: int, head_bytes: int, chunk_tokens: int) -> dict[str, int]:
    """What the LM loss of one micro-batch of `tokens` tokens holds at its peak, by
    implementation (`lm_loss`): `kept` lives from the forward to the backward, `transient`
    only while the loss is computed. `medcare-dist plan` counts exactly this.

    full: the fp32 log-softmax (kept), and while the loss runs the model's logits (head
    dtype) with their fp32 copy, then in backward the log-softmax's fp32 gradient. chunked / liger: the gradient of the hidden
    rows ([tokens, hidden], kept), and one chunk's logits: the fp32 block plus its cast to the
    head dtype for the gradient matmul (liger: its own chunking; counted alike)."""
    if impl == "full":
        return {"kept": 4 * tokens * vocab, "transient": (head_bytes + 4 + 4) * tokens * vocab}
    return {"kept": head_bytes * tokens * hidden, "transient": (4 + head_bytes) * min(chunk_tokens, tokens) * vocab}


def _liger_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        raise ValueError("lm_loss 'liger' needs the liger-kernel package (pip install liger-kernel)") from None
    if not hidden.is_cuda:
        raise ValueError("lm_loss 'liger' runs on CUDA only; use 'chunked' on this device")
    return liger_fused_linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE_INDEX, reduction="sum")
