"""Build task models by name, save and load them, and move their weights as numpy arrays.

What travels (``get_weights`` / ``set_weights``) is the trainable parameters only, in
``state_dict`` order. Buffers are public catalogue metadata every party rebuilds from the
``ModelSpec`` (``item_category``, feature offsets: not even in the ``state_dict``) or loads from
public data (``TwoTower.item_text``: saved with the model, never sent).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fedrec.models.base import ModelSpec, TaskModel
from fedrec.models.content import CONTENT_MODELS
from fedrec.models.ranking import DCNv2
from fedrec.models.recall import TwoTower
from fedrec.models.sequential import SASRec

TASKS = ("recall", "ranking", "personal")
MODELS: dict[str, type[TaskModel]] = {"recall": TwoTower, "ranking": DCNv2, "personal": SASRec}
ARCHS: dict[str, dict[str, type[TaskModel]]] = {"id": MODELS, "content": dict(CONTENT_MODELS)}
"""Model families: "id" (item-ID embeddings, optionally with text beside or instead) and
"content" (small linear models over frozen item text, built for DP: models/content.py)."""
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def build_model(task: str, spec: ModelSpec, *, arch: str = "id", **hparams: Any) -> TaskModel:
    """A freshly initialised model for ``task`` of family ``arch`` (seed torch beforehand for
    identical copies)."""
    if task not in MODELS:
        raise ValueError(f"unknown task {task!r}; valid tasks are {', '.join(TASKS)}")
    if arch not in ARCHS:
        raise ValueError(f"unknown model family {arch!r}; valid ones are {', '.join(ARCHS)}")
    return ARCHS[arch][task](spec, **hparams)


def arch_of(model: TaskModel) -> str:
    """The family ``build_model`` rebuilds ``model`` with."""
    inner = _unwrap(model)
    return next(a for a, m in ARCHS.items() if type(inner) is m.get(inner.task))


def save_model(model: TaskModel, directory: str | Path) -> None:
    """Write ``model.safetensors`` (the full state dict) and ``config.json`` (task, spec,
    hparams) into ``directory``, so ``load_model`` rebuilds the model without other input."""
    model = _unwrap(model)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    config = {
        "task": model.task,
        "arch": arch_of(model),
        "spec": asdict(model.spec),
        "hparams": _hparams(model),
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def load_model(directory: str | Path) -> TaskModel:
    """The model saved by ``save_model`` in ``directory``, in eval mode."""
    src = Path(directory)
    config = json.loads((src / CONFIG_FILE).read_text())
    model = build_model(
        config["task"], _spec(config["spec"]), arch=config.get("arch", "id"), **config["hparams"]
    )
    model.load_state_dict(load_file(str(src / WEIGHTS_FILE)), strict=True)
    return model.eval()


def get_weights(model: TaskModel) -> dict[str, np.ndarray]:
    """The trainable parameters as float32 numpy copies, keyed and ordered as in ``state_dict``."""
    return {k: v.detach().cpu().numpy().copy() for k, v in _travelling(_unwrap(model)).items()}


def set_weights(model: TaskModel, weights: dict[str, np.ndarray]) -> None:
    """Load ``get_weights`` output in place; keys and shapes must match exactly."""
    own = _travelling(_unwrap(model))
    if set(weights) != set(own):
        missing, extra = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
        raise ValueError(f"weights do not match the model: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    with torch.no_grad():
        for name, param in own.items():
            value = torch.as_tensor(np.asarray(weights[name]))
            if value.shape != param.shape:
                raise ValueError(f"weight {name!r} has shape {tuple(value.shape)}, expected "
                                 f"{tuple(param.shape)}")
            param.copy_(value)


def _spec(raw: dict[str, Any]) -> ModelSpec:
    return ModelSpec(
        num_items=int(raw["num_items"]),
        item_category=tuple(int(c) for c in raw["item_category"]),
        num_categories=int(raw["num_categories"]),
        user_feature_cards=tuple(int(c) for c in raw["user_feature_cards"]),
        context_cards=tuple(int(c) for c in raw["context_cards"]),
        max_len=int(raw["max_len"]),
        dim=int(raw["dim"]),
    )


def _travelling(model: TaskModel) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {k: params[k] for k in model.state_dict(keep_vars=True) if k in params}


def _unwrap(model: nn.Module) -> TaskModel:
    """The TaskModel inside an Opacus GradSampleModule (which keeps it as ``_module``)."""
    inner = getattr(model, "_module", model)
    if not isinstance(inner, TaskModel):
        raise TypeError(f"expected a TaskModel, got {type(inner).__name__}")
    return inner


def _hparams(model: TaskModel) -> dict[str, Any]:
    hparams = getattr(model, "hparams", None)
    if not isinstance(hparams, dict):
        raise TypeError(f"{type(model).__name__} does not record its hparams")
    return dict(hparams)
