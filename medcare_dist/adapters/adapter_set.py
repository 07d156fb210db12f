"""The trainable adapters of a model, kept outside the model's module tree.

Why outside: under ZeRO-3 every parameter DeepSpeed can see is partitioned, and a
partitioned parameter is an empty placeholder outside its module's forward. Stage 2's
orthogonality loss reads adapter weights outside any forward; a loss built from a gathered
copy (`safe_get_full_fp32_param`) is detached and trains nothing, and computing it inside
the forward fails in backward because ZeRO-3 has released the weights by then.

So the adapters live in an `AdapterSet`, a separate nn.Module that is never registered as a
submodule of the base model. It is attached with forward hooks on the base Linears
(`y = base(x) + sum(adapter(x))`), DeepSpeed partitions only the frozen base, and every
rank holds a full copy of each adapter. Any loss term on adapter weights is then an ordinary
local autograd expression: no collective, exact gradient. The price is that the adapters'
gradients must be summed across ranks by the trainer (`grad_buckets.GradientBuckets`, during
the last backward of a step; each rank's loss is already divided by the global batch's token
count).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn as nn

from medcare_dist.errors import AdapterLayoutError, CheckpointError, ConfigError

_SEP = ":"  # nn.ModuleDict keys may not contain "."; module paths do.


class AdapterSet(nn.Module):
    """Adapters grouped by name ("attn_lora", "molora", "knowledge", ...), each keyed by the
    dotted path of the base nn.Linear it adapts."""

    def __init__(self):
        super().__init__()
        self.groups = nn.ModuleDict()
        self._hooks: list = []

    def add(self, group: str, target: str, adapter: nn.Module) -> None:
        if group not in self.groups:
            self.groups[group] = nn.ModuleDict()
        self.groups[group][target.replace(".", _SEP)] = adapter

    def items(self, group: str | None = None) -> Iterator[tuple[str, str, nn.Module]]:
        """(group, target path, adapter) for every adapter, in insertion order."""
        for name, members in self.groups.items():
            if group is None or name == group:
                for key, adapter in members.items():
                    yield name, key.replace(_SEP, "."), adapter

    def drop_group(self, group: str) -> None:
        del self.groups[group]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def targets(self) -> dict[str, list[nn.Module]]:
        by_target: dict[str, list[nn.Module]] = {}
        for _, target, adapter in self.items():
            by_target.setdefault(target, []).append(adapter)
        return by_target

    # --- attaching to a base model -------------------------------------------------

    def attach(self, model: nn.Module, compute_dtype: torch.dtype | None = None) -> None:
        """Hook every adapter onto its base Linear in `model` (which must not own them).

        compute_dtype: the dtype the adapters' matmuls run in (the Linear's input is cast to
        it, a no-op when it already is); None: the adapters' own (fp32) weight dtype."""
        if self._hooks:
            raise RuntimeError("AdapterSet is already attached")
        modules = dict(model.named_modules())
        for target, adapters in self.targets().items():
            if target not in modules:
                raise KeyError(f"adapter target {target!r} is not a module of {type(model).__name__}")
            self._hooks.append(modules[target].register_forward_hook(_adding_hook(adapters, compute_dtype)))

    def detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # --- flat, PEFT-like tensor names for checkpoints ----------------------------------

    def flat_state_dict(self) -> dict[str, torch.Tensor]:
        """{"group.target.param": tensor}, e.g. "molora.model.layers.0.mlp.up_proj.ka_A"."""
        return {
            adapter_tensor_name(group, target, pname): p.detach()
            for group, target, adapter in self.items()
            for pname, p in adapter.named_parameters()
        }

    def load_flat_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        own = {
            adapter_tensor_name(group, target, pname): p
            for group, target, adapter in self.items()
            for pname, p in adapter.named_parameters()
        }
        missing, unexpected = own.keys() - tensors.keys(), tensors.keys() - own.keys()
        if missing or unexpected:
            raise AdapterLayoutError(
                f"adapter weights do not match the adapter layout: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        with torch.no_grad():
            for name, p in own.items():
                if tensors[name].shape != p.shape:
                    raise CheckpointError(f"{name}: shape {tuple(tensors[name].shape)} != expected {tuple(p.shape)}")
                p.copy_(tensors[name])

    def trainable_by_depth(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """(flat name, param) of every trainable param, those of the deepest adapted module of
        `model` first: roughly the order in which backward finishes their gradients."""
        position = {name: i for i, (name, _) in enumerate(model.named_modules())}
        forward_order = sorted(
            ((position[target], adapter_tensor_name(group, target, pname), p)
             for group, target, adapter in self.items() for pname, p in adapter.named_parameters() if p.requires_grad),
            key=lambda entry: entry[0],
        )
        return [(name, p) for _, name, p in reversed(forward_order)]

    def layout(self) -> dict[str, dict[str, list[int]]]:
        """Shapes per tensor, grouped: recorded in manifests so later steps can check inputs."""
        out: dict[str, dict[str, list[int]]] = {}
        for name, tensor in self.flat_state_dict().items():
            out.setdefault(adapter_group(name), {})[name] = list(tensor.shape)
        return out


def linear_targets(model: nn.Module, leaf_names: list[str]) -> list[tuple[str, nn.Linear]]:
    """Every nn.Linear whose last path component is in `leaf_names`, in model order."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in leaf_names]
    if leaf_names and not found:
        raise ConfigError(f"no Linear layer named any of {leaf_names} in {type(model).__name__}")
    return found


# --- flat tensor names: "{group}.{target}.{param}", the layout of every adapter file -------------

def adapter_tensor_name(group: str | None, target: str, param: str) -> str:
    """"{group}.{target}.{param}" (a checkpoint), "{target}.{param}" when group is None (a
    stage-2 base's knowledge adapter)."""
    return f"{group}.{target}.{param}" if group else f"{target}.{param}"


def adapter_group(name: str) -> str:
    """The group of a checkpoint's adapter tensor name."""
    return name.split(".", 1)[0]


def lora_pairs(tensors: dict[str, torch.Tensor], group: str, a_name: str, b_name: str) -> dict[str, tuple]:
    """{target: (A, B)} for one adapter group of flat tensors, A and B named by the adapter
    class that owns them (`LoRA.PAIR`, `MoLoRA.KNOWLEDGE_PAIR`)."""
    prefix, suffix = f"{group}.", f".{a_name}"
    return {
        name[len(prefix):-len(suffix)]: (t, tensors[name[: -len(suffix)] + f".{b_name}"])
        for name, t in tensors.items()
        if name.startswith(prefix) and name.endswith(suffix)
    }


def adapter_compute_dtype(name: str, base_dtype: torch.dtype) -> torch.dtype:
    """`adapter_dtype` option -> matmul dtype. auto: bf16 when the base computes in bf16
    (the default on GPUs with bf16), else fp32. The weights and optimizer state stay fp32."""
    if name == "auto":
        return torch.bfloat16 if base_dtype == torch.bfloat16 else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def _adding_hook(adapters: list[nn.Module], compute_dtype: torch.dtype | None) -> Callable:
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0].to(compute_dtype or next(adapters[0].parameters()).dtype)  # one cast per Linear, shared
        for adapter in adapters:
            output = output + adapter(x).to(output.dtype)
        return output

    return hook
