"""Former home of the shared training helpers, kept so that older imports keep working.

The helpers now live by concept; import them from there:

* :mod:`backend.train.config` — ``load_config``, ``config_to_dict``, ``parse_overrides``, ``ranged``
* :mod:`backend.checkpoint` — ``save_checkpoint``, ``load_checkpoint``, ``CHECKPOINT_FORMAT``
* :mod:`backend.train.checkpoint` — RNG snapshots and the ``--resume`` rules
* :mod:`backend.train.distributed` — ``DistInfo``, ``setup_distributed``, ``start_run``, ``wrap_ddp``
* :mod:`backend.train.loop` — ``TrainingLoop``, ``MetricsWriter``, ``optimizer_step``, ``progress``
* :mod:`backend.train.data` — ``DrawSchedule``, ``DrawSampler``, ``SeededDraws``
"""

from __future__ import annotations

from backend.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from backend.train.checkpoint import (
    check_resume,
    load_resume_checkpoint,
    rank_rng_states,
    refuse_fresh_run_over,
    restore_rank_rng_state,
    resume_lr_scheduler,
    resume_path,
    rng_state,
    seed_everything,
    set_rng_state,
)
from backend.train.config import config_to_dict, load_config, parse_overrides
from backend.train.data import DrawSampler, DrawSchedule, SeededDraws
from backend.train.distributed import (
    DistInfo,
    get_logger,
    setup_distributed,
    start_run,
    teardown_distributed,
    wrap_ddp,
)
from backend.train.loop import GracefulInterrupt, MetricsWriter, TrainingLoop, check_output_dir, progress

__all__ = [
    "CHECKPOINT_FORMAT", "DistInfo", "DrawSampler", "DrawSchedule", "GracefulInterrupt", "MetricsWriter",
    "SeededDraws", "TrainingLoop", "check_output_dir", "check_resume", "config_to_dict", "get_logger",
    "load_checkpoint", "load_config", "load_resume_checkpoint", "parse_overrides", "progress", "rank_rng_states",
    "refuse_fresh_run_over", "restore_rank_rng_state", "resume_lr_scheduler", "resume_path", "rng_state",
    "save_checkpoint", "seed_everything", "set_rng_state", "setup_distributed", "start_run",
    "teardown_distributed", "wrap_ddp",
]
