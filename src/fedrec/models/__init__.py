"""Task models under one contract (``base.TaskModel``): two-tower recall, DCN-V2 ranking, SASRec,
and their content variants over frozen item text, built for DP (``content``)."""

from fedrec.models.base import ModelSpec, SequenceBatch, TaskModel, UserBatch
from fedrec.models.batching import make_sequence_batch, make_user_batch
from fedrec.models.content import (
    ContentModel,
    ContentRanking,
    ContentRetrieval,
    ContentSequential,
)
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
    "ContentModel",
    "ContentRanking",
    "ContentRetrieval",
    "ContentSequential",
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
