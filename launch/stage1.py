"""Stage 1 of MedCare, knowledge aggregation.

    deepspeed --num_gpus 8 launch/stage1.py --config launch/configs/stage1_qwen7b.yaml [--key value ...]

Frozen base (ZeRO-3 partitioned); LoRA on attention; a mixture of LoRA experts (shared
Knowledge Aggregator + routed Noise Aggregator) on every FFN projection.
"""

from medcare_dist.training.recipe import main_for_stage
from medcare_dist.method.stage1 import RouterObjective, check_stage1_base, stage1_adapters

if __name__ == "__main__":
    raise SystemExit(
        main_for_stage(
            stage=1,
            build_adapters=stage1_adapters,
            build_objective=lambda adapters, cfg: RouterObjective(adapters, cfg.router_aux_loss_coef),
            check_base=check_stage1_base,
        )
    )
