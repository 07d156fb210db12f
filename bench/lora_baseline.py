"""Plain LoRA through the MedCare launcher: the baseline that bench/gpu_scale.sh compares the stages with.

    deepspeed --num_gpus 1 bench/lora_baseline.py --model DIR --data FILE [--key value ...]

LoRA of rank lora_r (scale from lora_alpha, use_rslora) on every attention and FFN projection
(attn_targets + ffn_targets) and the default Objective (the language-model loss alone): the
usual LoRA fine-tune, run by the same trainer, data path and DeepSpeed ZeRO-3 engine as
launch/stage1.py and launch/stage2.py. It takes stage 1's options (`--help`); those of the
experts (num_experts, top_k, ...) are unused.
"""

from medcare_dist.adapters.adapter_set import AdapterSet, linear_targets
from medcare_dist.adapters.lora import LoRA, lora_scale
from medcare_dist.method.objective import Objective
from medcare_dist.training.recipe import main_for_stage


def lora_adapters(model, cfg) -> AdapterSet:
    scale = lora_scale(cfg.lora_alpha, cfg.lora_r, cfg.use_rslora)
    adapters = AdapterSet()
    for path, linear in linear_targets(model, list(cfg.attn_targets) + list(cfg.ffn_targets)):
        adapters.add("lora", path, LoRA(linear.in_features, linear.out_features, cfg.lora_r, scale, cfg.lora_dropout))
    return adapters


if __name__ == "__main__":
    raise SystemExit(main_for_stage(stage=1, build_adapters=lora_adapters, build_objective=lambda adapters, cfg: Objective()))
