"""Stage 2 of MedCare, clinical alignment.

    medcare-dist prepare-stage2 --stage1 runs/stage1/checkpoint-N --out runs/stage2-base
    deepspeed --num_gpus 8 launch/stage2.py --config my_stage2.yaml --model runs/stage2-base

`--model` is the prepared stage-2 base (base with the attention LoRA merged, plus the
knowledge adapter). Each FFN projection gets the knowledge adapter and a new alignment
adapter; loss = LM + ortho_lambda * sum |A_know @ A_align^T|.
"""

from medcare_dist.training.recipe import main_for_stage
from medcare_dist.artefacts.stage2_base import adapters_on_stage2_base, check_stage2_base
from medcare_dist.method.stage2 import OrthogonalObjective

if __name__ == "__main__":
    raise SystemExit(
        main_for_stage(
            stage=2,
            build_adapters=adapters_on_stage2_base,
            build_objective=lambda adapters, cfg: OrthogonalObjective(adapters, cfg.ortho_lambda),
            check_inputs=lambda cfg: {"stage2_base": check_stage2_base(cfg.model)},
        )
    )
