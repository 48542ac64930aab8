"""Task models under one contract (``base.TaskModel``): two-tower recall, DCN-V2 ranking, SASRec."""

from fedrec.models.base import ModelSpec, SequenceBatch, TaskModel, UserBatch
from fedrec.models.batching import make_sequence_batch, make_user_batch
from fedrec.models.ranking import DCNv2
from fedrec.models.recall import TwoTower
from fedrec.models.registry import (
    TASKS,
    build_model,
    get_weights,
    load_model,
    save_model,
    set_weights,
)
from fedrec.models.sequential import SASRec

__all__ = [
    "TASKS",
    "DCNv2",
    "ModelSpec",
    "SASRec",
    "SequenceBatch",
    "TaskModel",
    "TwoTower",
    "UserBatch",
    "build_model",
    "get_weights",
    "load_model",
    "make_sequence_batch",
    "make_user_batch",
    "save_model",
    "set_weights",
]
