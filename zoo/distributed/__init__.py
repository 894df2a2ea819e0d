"""Training on many processes with torch.distributed: DDP and FSDP2 (:mod:`.parallel`), sequence parallelism
(:mod:`.sequence_parallel`: Ulysses all-to-all attention, Mamba-2 state passing), sharded checkpoints with exact
resume and consolidation (:mod:`.checkpoint`), process-group start-up (:mod:`.launch`), the training loop on many
processes (:mod:`.trainer`: ``zoo.train.Trainer`` with the distributed hooks) and ``zoo train`` (:mod:`.run`)."""

from zoo.distributed.checkpoint import (
    TrainState,
    consolidate,
    gather_full_model,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_pretrained_distributed,
)
from zoo.distributed.launch import DistInfo, init_distributed, run_local
from zoo.distributed.parallel import (
    STRATEGIES,
    Parallelism,
    all_reduce_sum,
    lm_loss,
    parallelize,
    setup_parallelism,
    shard_batch,
    unwrap,
)
from zoo.distributed.run import run_training
from zoo.distributed.sequence_parallel import (
    SequenceComm,
    SequenceShard,
    disable_sequence_parallel,
    enable_sequence_parallel,
    shard_sequence,
    shift_targets,
)
from zoo.distributed.trainer import DistributedTrainer, autocast_dtype

__all__ = [
    "DistInfo", "init_distributed", "run_local",
    "STRATEGIES", "Parallelism", "setup_parallelism", "parallelize", "unwrap", "shard_batch", "lm_loss",
    "all_reduce_sum",
    "SequenceComm", "SequenceShard", "enable_sequence_parallel", "disable_sequence_parallel", "shard_sequence",
    "shift_targets",
    "TrainState", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "consolidate", "gather_full_model",
    "save_pretrained_distributed",
    "DistributedTrainer", "autocast_dtype", "run_training",
]
