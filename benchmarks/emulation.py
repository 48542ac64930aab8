"""FedAvg in one process, for the benchmarks that probe training settings without Flower
(dp_emulation.py, task_emulation.py): the server step the ServerApp's FedAvg takes, weighted by
each client's users, summed in float64 in client order."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from fedrec.training import LocalData

State = dict[str, dict[str, torch.Tensor]]  # task -> parameter name -> tensor


def initial_state(models: Mapping[str, torch.nn.Module]) -> State:
    return {t: {k: v.clone() for k, v in m.state_dict().items()} for t, m in models.items()}


def fedavg_round(
    models: Mapping[str, torch.nn.Module],
    state: State,
    clients: Sequence[LocalData],
    train: Callable[[int, LocalData], None],
) -> State:
    """Each client trains ``models`` from ``state`` (``train(client_index, data)``, in place);
    returns the users-weighted average of the trained states, loaded into ``models`` too."""
    total = sum(d.n_users for d in clients)
    acc = {t: {k: torch.zeros_like(v, dtype=torch.float64) for k, v in s.items()}
           for t, s in state.items()}  # fmt: skip
    for c, data in enumerate(clients):
        for t, m in models.items():
            m.load_state_dict(state[t])
        train(c, data)
        for t, m in models.items():
            for k, v in m.state_dict().items():
                acc[t][k] += v.double() * (data.n_users / total)
    new = {t: {k: v.to(state[t][k].dtype) for k, v in a.items()} for t, a in acc.items()}
    for t, m in models.items():
        m.load_state_dict(new[t])
    return new
