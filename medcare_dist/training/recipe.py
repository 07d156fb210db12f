"""What both stage launchers share: from a config to a fitted Trainer.

The launchers (launch/stage1.py, launch/stage2.py) only say which adapters and which
objective their stage uses; everything else happens here, in this order, so that bad
input fails before any process group or model load where possible.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch

from medcare_dist.adapters.adapter_set import AdapterSet, adapter_compute_dtype
from medcare_dist.artefacts.manifest import base_fingerprint, base_record, versions
from medcare_dist.files import require_output_dir
from medcare_dist.artefacts.checkpoint import check_output_dir
from medcare_dist.artefacts.run_lock import RunLock, release_held
from medcare_dist.config import TrainConfig, load_config, options_help, parse_overrides
from medcare_dist.errors import ConfigError, MedcareError
from medcare_dist.data.chat import pad_token_id
from medcare_dist.artefacts.hf_io import check_model_dir
from medcare_dist.artefacts.hub import resolve_dataset, resolve_model
from medcare_dist.dist.preemption import EXIT_PREEMPTED, StopRequests
from medcare_dist.dist.rank_env import launch_local_rank, launch_rank, without_local_rank
from medcare_dist.training.zero3 import enable_activation_checkpointing
from medcare_dist.training.lm_loss import check_lm_loss, check_logits_after_head
from medcare_dist.training.metrics import check_report_to
from medcare_dist.training.resume import check_resume_early
from medcare_dist.training.trainer import Objective, Trainer


def config_from_argv(argv: list[str], stage: int) -> TrainConfig:
    """`--config FILE` plus `--key value` overrides. The `--local_rank` argument that the
    deepspeed runner appends is ignored: LOCAL_RANK in the environment says the same."""
    args = without_local_rank(argv)
    if "--help" in args or "-h" in args:
        print(f"usage: deepspeed launch/stage{stage}.py [--config FILE.yaml] [--option value ...]\n\n"
              "Options come from the YAML file and the command line (which wins); lists take several values.\n")
        print(options_help(stage))
        raise SystemExit(0)
    config_path = None
    if "--config" in args:
        i = args.index("--config")
        if i + 1 >= len(args):
            raise SystemExit("--config needs a path")
        config_path = args[i + 1]
        del args[i:i + 2]
    return load_config(config_path, parse_overrides(args), stage=stage)


def build_trainer(
    cfg: TrainConfig,
    build_adapters: Callable[[torch.nn.Module, TrainConfig], AdapterSet],
    build_objective: Callable[[AdapterSet, TrainConfig], Objective],
    check_inputs: Callable[[TrainConfig], dict] | None = None,
    check_base: Callable[[torch.nn.Module, TrainConfig], str] | None = None,
) -> Trainer:
    """Check inputs, load data, join the process group, load the partitioned base, attach
    the adapters. `check_base` refuses a base the stage cannot adapt (on its weightless
    skeleton) and says what it adapts. `check_inputs` validates the stage's own inputs and returns what the
    checkpoint manifests should record about them. Everything that can be wrong with the
    user's input is found before the process group and the model load."""
    from transformers import AutoTokenizer

    from medcare_dist.dist import process_group as dist_utils
    from medcare_dist.dist import node_local
    from medcare_dist.data.cache import default_cache_dir
    from medcare_dist.data.dataset import default_num_proc, load_dataset_for_training
    from medcare_dist.data.sources import resolve_sources
    from medcare_dist.artefacts.hf_model import load_frozen_base, model_skeleton, resolve_dtype
    from medcare_dist.training.zero3 import base_checksum, build_ds_config, check_ds_config

    dist_utils.check_launch(cfg)  # batch size vs the ranks the launcher started, before any rendezvous
    is_main = launch_rank() == 0
    log = print if is_main else (lambda *_: None)
    if not is_main:
        import datasets

        datasets.disable_progress_bars()
    check_report_to(cfg.report_to)
    check_ds_config(cfg)  # a DeepSpeed config that cannot work, found before data and process group
    out_dir = require_output_dir(cfg.output_dir)
    if is_main:  # one writer per output_dir, before anything is written; creates the dir (a one-line error if it cannot)
        RunLock.take(out_dir, log=log)
    check_output_dir(out_dir, cfg.resume, cfg.overwrite)  # a fresh run never writes over another's checkpoints
    manifest_extra = check_inputs(cfg) if check_inputs else {}
    # Data files found (a typo named) before a hub model is fetched; hub datasets fetched once per node.
    sources = resolve_sources(cfg.data, fetch_dataset=lambda name: resolve_dataset(name, log=log))
    source = resolve_model(cfg.model, log=log)  # a hub model: fetched once per node, then local
    check_model_dir(Path(source.path))
    skeleton = model_skeleton(source.path, cfg.trust_remote_code)  # what the model is, before any process group
    check_lm_loss(skeleton, cfg.lm_loss)
    if check_base:
        log(check_base(skeleton, cfg))
    check_resume_early(cfg, base_fingerprint(source.path))  # a resume with changed training options fails here, in seconds
    dtype = resolve_dtype(cfg.dtype)
    if dtype == torch.float16 and not torch.cuda.is_available():
        raise ConfigError("dtype fp16 needs a CUDA GPU: DeepSpeed does not run fp16 on the CPU accelerator; use bf16 or fp32")
    tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=cfg.trust_remote_code)
    pad_id = pad_token_id(tokenizer)
    dataset, _ = load_dataset_for_training(sources, tokenizer, cfg.max_length, cfg.on_bad_record,
                                           cfg.num_proc or default_num_proc(), cfg.control_tokens, log=log, seed=cfg.seed,
                                           cache_dir=cfg.data_cache or default_cache_dir(), thinking=cfg.thinking,
                                           **_data_writer(cfg))

    world = dist_utils.init_distributed(cfg.timeout_minutes)
    ds_config = node_local.configure(build_ds_config(cfg, world.world_size, dtype), cfg.ds_config)
    import deepspeed

    model = load_frozen_base(source.path, ds_config, dtype, cfg.trust_remote_code)
    if cfg.grad_checkpointing:
        enable_activation_checkpointing(model)
    torch.manual_seed(cfg.seed)
    adapters = build_adapters(model, cfg).to(world.device)
    dist_utils.broadcast_params(list(adapters.parameters()))
    adapter_dtype = adapter_compute_dtype(cfg.adapter_dtype, dtype)
    adapters.attach(model, adapter_dtype)
    adapters.train()
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    if cfg.lm_loss != "full":  # its logits come from the LM head: they must be the model's own (ZeRO-3 gathers from here on)
        adapters.eval()
        check_logits_after_head(engine.module, world.device)
        adapters.train()
    engine.module.train()
    n_trainable = sum(p.numel() for p in adapters.trainable_parameters())
    log(f"world size {world.world_size}, dtype {dtype}, adapter matmuls {adapter_dtype}, trainable adapter params {n_trainable:,} (unsharded on every rank)")
    manifest = {
        "stage": cfg.stage,
        **base_record(source),
        "base_checksum": base_checksum(model),
        "adapter_layout": adapters.layout(),
        "versions": versions(),
        **manifest_extra,
    }
    return Trainer(cfg, world, engine, adapters, dataset, build_objective(adapters, cfg), pad_id, manifest, log=log)


def _data_writer(cfg: TrainConfig) -> dict:
    """Who tokenises the data into the cache (the process group does not exist yet): global
    rank 0 when the cache dir is shared by all nodes, else local rank 0 of each node. The
    others wait and say so (`note`)."""
    rank = launch_rank()
    writer = rank == 0 if cfg.data_cache_shared else launch_local_rank() == 0
    return {"writer": writer, "writer_name": "rank 0" if cfg.data_cache_shared else "local rank 0 of this node",
            "note": lambda line: print(f"rank {rank}: {line}", flush=True)}


def main_for_stage(stage: int, build_adapters, build_objective, check_inputs=None, check_base=None) -> int:
    """Entry point of a launcher: bad input ends the process with a one-line error, status 2; a
    run stopped by a stop signal or a lost launcher saves and exits with EXIT_PREEMPTED (75)."""
    from medcare_dist.dist import process_group as dist_utils

    try:
        cfg = config_from_argv(sys.argv[1:], stage)
        stop = StopRequests(cfg.preempt_signals)  # the launcher as it is now, before the minutes of setup
        trainer = build_trainer(cfg, build_adapters, build_objective, check_inputs, check_base)
        with stop:  # signals and a lost launcher: save at the next step boundary, then exit EXIT_PREEMPTED
            trainer.fit(stop)
        if trainer.stop_reason:
            return EXIT_PREEMPTED
    except MedcareError as err:
        print(f"stage {stage}: error: {err}", file=sys.stderr)
        return 2
    finally:
        release_held()  # the output_dir lock (rank 0)
        dist_utils.shutdown()
    return 0
