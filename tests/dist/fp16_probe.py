"""Run by tests/test_reliability.py (not a pytest file), as one plain process (a world of one
under the real ZeRO-3 engine): the stage-1 trainer's adapter gradients of the first global
batch, and in fp16 the dynamic loss scaler at work. Writes --probe_out (safetensors + json).

    --dtype fp32: grads.safetensors
    --dtype fp16: grads.safetensors (loss scaled, as the trainer does), grads_unscaled.safetensors
                  (the same backward without scaling), steps.json (train steps from the DeepSpeed
                  config's initial_scale_power: scale before/after, adapters changed or not),
                  resumed.json (the scaler state saved in the checkpoint and restored by a resume)
"""

import dataclasses
import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from medcare_dist.data import plan_global_batches
from medcare_dist.model import stage1_adapters
from medcare_dist.recipe import build_trainer, config_from_argv
from medcare_dist.routing import RouterObjective
from medcare_dist.trainer import adapter_digest, grad_scaler

args = sys.argv[1:]
i = args.index("--probe_out")
out = Path(args[i + 1])
del args[i:i + 2]
out.mkdir(parents=True, exist_ok=True)
cfg = config_from_argv(args, stage=1)
trainer = build_trainer(cfg, stage1_adapters, lambda a, c: RouterObjective(a, c.router_aux_loss_coef))
batch = plan_global_batches(trainer.lengths, cfg.global_batch_size, cfg.seed, 0)[0]


def gradients(scaler) -> dict:
    configured, trainer.scaler = trainer.scaler, scaler
    trainer.compute_gradients(batch)
    scaler.unscale_(trainer.optimizer)
    grads = {n: p.grad.detach().clone() for n, p in trainer.adapters.named_parameters() if p.requires_grad}
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.scaler = configured
    return grads


default_scaling = dataclasses.replace(cfg, ds_config="ds_configs/zero3.json")  # initial scale 2**16
save_file(gradients(grad_scaler(default_scaling, trainer.world.device)), str(out / "grads.safetensors"))
if cfg.dtype == "fp16":
    save_file(gradients(grad_scaler(dataclasses.replace(cfg, dtype="fp32"), trainer.world.device)), str(out / "grads_unscaled.safetensors"))
    steps = []
    for step in range(12):
        before, scale = adapter_digest(trainer.adapters.flat_state_dict()), trainer.scaler.get_scale()
        trainer.train_step(batch)
        trainer.state.step += 1
        steps.append({"scale": scale, "scale_after": trainer.scaler.get_scale(),
                      "changed": adapter_digest(trainer.adapters.flat_state_dict()) != before})
    (out / "steps.json").write_text(json.dumps(steps))
    trainer.save()
    saved = json.loads((Path(cfg.output_dir) / f"checkpoint-{trainer.state.step}" / "trainer_state.json").read_text())["grad_scaler"]
    trainer.scaler = grad_scaler(cfg, trainer.world.device)  # a fresh scaler, as a new process would have
    trainer.cfg.resume = "auto"
    trainer.maybe_resume()
    (out / "resumed.json").write_text(json.dumps({"saved": saved, "restored": trainer.scaler.state_dict()}))
