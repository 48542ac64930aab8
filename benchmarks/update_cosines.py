"""How far honest updates agree in direction: the figures behind the screen's direction rule.

    .venv/bin/python benchmarks/update_cosines.py [--rounds 4] [--dp-noise Z] [--text content]
        [--partition user] [--steer K [K ...]]

Runs the default federation's clients in one process (no Flower: FedAvg weighted by users, as
the server does) and prints, per round and task, the cosine of each honest client's update
with the coordinate-wise median of the other updates: minimum, 10th percentile, median, and the three
smallest silos; each update's norm over the round's median norm; and over the norm the
screen predicts for it from its client's users (``norm_reference = "size"``; the norm rule acts
above ``reject_norm_factor`` times it, default 3). ``--dp-noise Z`` trains under DP-SGD with
noise multiplier Z (clipping norm 1, fresh noise per client) to show how noise moves them; ``--text content`` uses the
content models (the ones to use under DP). The screen rejects an update below
``reject_min_cosine`` (default 0): a sign-flipped update has about minus an honest one's cosine.

``--steer K`` also asks what K colluding clients can do to the direction rule by steering the
coordinate-wise median rather than by sending a flipped update: aimed at one honest client,
each sends, per coordinate, the opposite of that client's sign at the largest honest magnitude,
scaled to the largest norm the norm rule passes unchanged (3x the norm predicted for a client
stating the median users). Printed per round and task: how many honest clients such an attack
pushes below cosine 0 with the median (each aimed at in turn) and the share of the users they
hold (the K colluders are added to the honest clients); aimed at the largest of those, the share
of the users whose updates then fall below 0, and the colluders' own cosine. Under
``direction_outliers = "reject"`` a pushed honest update is left out of the round, as if its
client had dropped out; under ``"reflect"`` one pushed to ``-reflect_min_cosine`` or below
passes the margin and enters negated, at its client's full weight, if the median of all
updates, its own included, also puts it below 0 (a second condition not modelled here).

That attacker knows the target's update, noise included: only the target and the server see
it. ``--blind`` (with ``--dp-noise``) aims the same attack with what colluding clients could
know at best, the target's data and the global model but not its noise: the update the target
would send without noise (each client also trained with noise multiplier 0, its own Poisson
draws); the honest updates it is measured against are the noisy ones.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from fedrec.client.local import build_task_models, train_round
from fedrec.config import load_config
from fedrec.strategies.screen import median_and_leave_one_out, predicted_norms
from fedrec.training import DPSGDParams
from fedrec.workload import build_workload

DEFAULTS = load_config(None)


def flat(model: torch.nn.Module) -> np.ndarray:
    return torch.cat([p.detach().flatten().double() for p in model.parameters()]).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--dp-noise", type=float, default=0.0, help="DP-SGD noise multiplier")
    parser.add_argument("--text", default="off", help="off | content")
    parser.add_argument("--partition", help="e.g. user (one client per user: cross-device)")
    parser.add_argument("--steer", type=int, nargs="*", default=[],
                        help="colluding clients steering the median (module doc)")
    parser.add_argument("--blind", action="store_true",
                        help="with --dp-noise: aim --steer without the target's noise")
    parser.add_argument("--reflect-cosine", type=float, default=DEFAULTS.reflect_min_cosine,
                        help="with --steer: also count honest updates pushable to cosine -C or "
                             "below, which reflection would keep negated (config "
                             "reflect_min_cosine)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    over = {"text.mode": args.text} | ({"partition": args.partition} if args.partition else {})
    cfg = load_config(None, over)
    work = build_workload(cfg)
    models = build_task_models(cfg, work.spec, cfg.seed, item_text=work.item_text(cfg.text))
    clients = [work.client_data(c) for c in range(work.partition.n_clients)]
    sizes = np.array([d.n_users for d in clients])
    weights = sizes / sizes.sum()
    smallest = np.argsort(sizes)[:3]
    largest = int(np.argmax(sizes))
    dp = {t: DPSGDParams(args.dp_noise, 1.0) for t in models} if args.dp_noise else None
    if args.blind and dp is None:
        parser.error("--blind needs --dp-noise (without noise the attacker's aim is the update)")
    noiseless = {t: DPSGDParams(0.0, 1.0) for t in models}
    state = {t: {k: v.clone() for k, v in m.state_dict().items()} for t, m in models.items()}
    last_step: dict[str, np.ndarray] = {}  # the global model's last move (FedAvg's), per task
    last_updates: dict[str, np.ndarray] = {}  # the honest updates of the last round, per task
    for r in range(1, args.rounds + 1):
        start = {t: flat(m) for t, m in models.items()}
        updates: dict[str, list[np.ndarray]] = {t: [] for t in models}
        aims: dict[str, list[np.ndarray]] = {t: [] for t in models}  # --blind: noise-free
        for c, data in enumerate(clients):
            for kind, noise, out in [(0, dp, updates), (1, noiseless, aims)][: 1 + args.blind]:
                for t, m in models.items():
                    m.load_state_dict(state[t])
                train_round(cfg, models, data, server_round=r, client_seed=c + 1000 * kind,
                            dp=noise)  # fmt: skip
                for t, m in models.items():
                    out[t].append(flat(m) - start[t])
        for t, m in models.items():
            u = np.stack(updates[t])
            cos = cosines_with_the_others(u)
            norms = np.linalg.norm(u, axis=1)
            print(
                f"round {r} {t:8} cosine with the median update: min {cos.min():.3f} "
                f"p10 {np.quantile(cos, 0.1):.3f} median {np.median(cos):.3f}; smallest silos "
                f"({', '.join(str(s) for s in sizes[smallest])} users) "
                f"{', '.join(f'{cos[i]:.3f}' for i in smallest)}",
                flush=True,
            )
            if t in last_step:
                lc = u @ last_step[t] / (norms * np.linalg.norm(last_step[t]) + 1e-30)
                print(
                    f"round {r} {t:8} cosine with the last round's global step: min "
                    f"{lc.min():.3f} p10 {np.quantile(lc, 0.1):.3f} median {np.median(lc):.3f}; "
                    f"smallest silos {', '.join(f'{lc[i]:.3f}' for i in smallest)}",
                    flush=True,
                )
            ratio = norms / np.median(norms)
            print(
                f"round {r} {t:8} norm / median norm: min {ratio.min():.2f} max "
                f"{ratio.max():.2f} (largest silo, {sizes[largest]} users: {ratio[largest]:.2f}; "
                f"smallest: {ratio[smallest[0]]:.2f})",
                flush=True,
            )
            predicted, slope = predicted_norms(norms, sizes)  # the screen's size reference
            fit = norms / predicted
            print(
                f"round {r} {t:8} norm / norm predicted from users (log-log Theil-Sen slope "
                f"{slope:.2f}): min {fit.min():.2f} max {fit.max():.2f} (largest silo "
                f"{fit[largest]:.2f}; smallest {fit[smallest[0]]:.2f})",
                flush=True,
            )
            for k in args.steer:
                attacked = steered_cosines(u, sizes, k)  # each target's, for both reports
                print(f"round {r} {t:8} {steering(attacked, sizes, k, args.reflect_cosine)}",
                      flush=True)
                if t in last_updates:
                    line = steering_both(
                        u, last_updates[t], sizes, k, args.reflect_cosine, attacked
                    )
                    print(f"round {r} {t:8} {line}", flush=True)
                if args.blind:  # the same attack without the target's noise, side by side
                    blind = steered_cosines(u, sizes, k, aim=np.stack(aims[t]))
                    print(f"round {r} {t:8} blind: "
                          f"{steering(blind, sizes, k, args.reflect_cosine)}", flush=True)
            last_step[t], last_updates[t] = weights @ u, u
            new = start[t] + last_step[t]  # FedAvg, weighted by users
            m.load_state_dict(state[t])
            torch.nn.utils.vector_to_parameters(torch.from_numpy(new).float(), m.parameters())
            state[t] = {k: v.clone() for k, v in m.state_dict().items()}


def cosines_with_the_others(rows: np.ndarray) -> np.ndarray:
    """Each row's cosine with the coordinate-wise median of the other rows, as the screen
    judges an update (strategies/screen.py)."""
    _, medians = median_and_leave_one_out(rows)
    dots = np.einsum("ij,ij->i", rows, medians)
    return dots / (np.linalg.norm(rows, axis=1) * np.linalg.norm(medians, axis=1) + 1e-30)


def allowed_norm(u: np.ndarray, sizes: np.ndarray, norm_factor: float = 3.0) -> float:
    """The largest norm the norm rule passes unchanged for a client stating the median users
    (what the steering colluders state), among honest updates ``u`` of clients of ``sizes``."""
    predicted, slope = predicted_norms(np.linalg.norm(u, axis=1), sizes)
    stated = float(np.median(sizes))
    return norm_factor * float(np.median(predicted / sizes**slope)) * stated**slope


def last_step_cosines(u: np.ndarray, last: np.ndarray, sizes: np.ndarray, k: int) -> np.ndarray:
    """Each honest update's cosine with the global model's last step when ``k`` colluders
    steered that step against it in the round before (the reference reflection also asks,
    module doc). Knowing the target's next update ``u[j]`` (an oracle: they cannot know it),
    each sent last round the direction that lowers it most while passing the direction rule
    then: minus ``u[j]`` made orthogonal to the median of last round's honest updates
    ``last``, at the largest norm the norm rule passes; the step is FedAvg over ``last`` and
    theirs (each stating the median users). Approximations: ``u`` is trained from the
    unattacked model; and each colluder is held to the honest updates' median, where the
    screen compares it with the median of the others, the other colluders among them, which
    would let k >= 2 colluders lean further against the target (so this can count too few)."""
    weights = np.append(sizes, [np.median(sizes)] * k).astype(float)
    weights /= weights.sum()
    median = np.median(last, axis=0)
    median /= max(float(np.linalg.norm(median)), 1e-30)
    allowed = allowed_norm(last, sizes)
    honest_step = weights[: len(last)] @ last
    cosines = []
    for target in u:
        a = -(target - (target @ median) * median)
        a *= allowed / max(float(np.linalg.norm(a)), 1e-30)
        step = honest_step + weights[len(last):].sum() * a
        cosines.append(target @ step / (np.linalg.norm(target) * np.linalg.norm(step) + 1e-30))
    return np.array(cosines)


def steering_both(
    u: np.ndarray, last: np.ndarray, sizes: np.ndarray, k: int, reflect_cosine: float,
    attacked: list[np.ndarray],
) -> str:
    """How many honest updates ``k`` colluders can get reflected under ``"reflect"``: pushed to
    ``-reflect_cosine`` or below against the others' median (this round, ``attacked`` from
    ``steered_cosines``) and against the global model's last step (the round before,
    ``last_step_cosines``). The condition on the median of all replies is not modelled (so this
    can count too many), and ``last_step_cosines`` may count too few (its doc)."""
    step = last_step_cosines(u, last, sizes, k)
    median = np.array([attacked[j][j] for j in range(len(u))])
    both = np.flatnonzero((step <= -reflect_cosine) & (median <= -reflect_cosine))
    return (f"{k} steering the last step: {np.sum(step < 0)} of {len(u)} honest updates "
            f"pushable below cosine 0 with it, {np.sum(step <= -reflect_cosine)} to "
            f"-{reflect_cosine:g} or below (lowest {step.min():.3f}); with the median too: "
            f"{len(both)} ({sizes[both].sum() / sizes.sum():.1%} of the users) past both "
            "margins, which reflection would keep negated")


def steered_cosines(
    u: np.ndarray, sizes: np.ndarray, k: int, norm_factor: float = 3.0,
    aim: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Per honest target ``j``: every row's cosine with the median of the others, honest rows
    first, when ``k`` colluders steer the median against ``j`` (module doc); ``u`` Float[n, P]
    the honest updates, ``sizes`` their users; ``aim`` Float[n, P] what the attackers know of
    each (default: ``u`` itself)."""
    aim = u if aim is None else aim
    allowed = allowed_norm(u, sizes, norm_factor)
    reach = np.abs(aim).max(axis=0)
    out = []
    for target in range(len(u)):
        a = -np.sign(aim[target]) * reach
        a *= allowed / max(float(np.linalg.norm(a)), 1e-30)
        out.append(cosines_with_the_others(np.vstack([u, np.repeat(a[None], k, 0)])))
    return out


def steering(
    cosines: list[np.ndarray], sizes: np.ndarray, k: int, reflect_cosine: float
) -> str:
    """What ``k`` clients steering the coordinate-wise median do to the direction rule (module
    doc), from ``steered_cosines``; ``sizes`` the honest clients' users; ``reflect_cosine`` the
    depth below 0 from which reflection keeps an update negated."""
    n = len(sizes)
    pushed = [j for j in range(n) if cosines[j][j] < 0]
    deep = [j for j in pushed if cosines[j][j] <= -reflect_cosine]
    lowest = min(cosines[j][j] for j in range(n))
    head = (f"{k} steering: {len(pushed)} of {n} honest clients pushable below cosine 0 "
            f"({sizes[pushed].sum() / sizes.sum():.1%} of the users), {len(deep)} to "
            f"-{reflect_cosine:g} or below ({sizes[deep].sum() / sizes.sum():.1%}); lowest "
            f"target cosine {lowest:.3f}")  # fmt: skip
    if not pushed:
        return head
    target = max(pushed, key=lambda j: sizes[j])
    cos = cosines[target]
    below = np.flatnonzero(cos[:n] < 0)
    return (
        f"{head}; aimed at the largest of them ({sizes[target]} users, cosine {cos[target]:.3f}): "
        f"{len(below)} honest below 0, {sizes[below].sum() / sizes.sum():.1%} of the users, "
        f"their updates left out of the round (reject; reflect past its margin, module doc); the "
        f"{k} steering {'pass' if cos[n] >= 0 else 'are themselves below'} the rule "
        f"(cosine {cos[n]:.3f})"
    )


if __name__ == "__main__":
    main()
