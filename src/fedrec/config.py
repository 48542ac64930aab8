"""The one typed configuration of a fedrec run, parsed once (TOML file, then flags) and frozen.

Every tunable lives here with the reason for its default. The resolved config is written into each
run directory and travels to clients as JSON inside each round's ConfigRecord, so a client never
depends on files the server has.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from fedrec.errors import FedrecError

TASKS = ("recall", "ranking", "personal")
# fields added after runs and partner sites existed, written (config.toml, the JSON every
# client gets, the checkpoint's config hash) only when set: an unfinished run of an earlier fedrec
# still resumes (same hash) and a partner site on an earlier fedrec still accepts the default
# config (it refuses keys it does not know). direction_outliers was written when "reflect" until
# its default became "reflect" (server/checkpoint.py still accepts those runs' hashes)
SET_ONLY: dict[str, Any] = {
    "register_users": False, "direction_outliers": "reflect", "reflect_min_cosine": 0.1,
}
STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum")
# strategies that need only the (weighted) sum of the updates, which secure aggregation gives
SUM_STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam")
PRIVACY_MODES = ("none", "record", "user")
FUSION_FITS = ("auto", "server", "federated", "fixed", "dp")
NOISE_PLACES = ("local", "distributed")
DIRECTION_OUTLIERS = ("reject", "reflect")
TEXT_MODES = ("off", "beside", "instead", "content")


class ConfigError(FedrecError):
    """A setting is invalid; the message names the field and the fix."""


@dataclass(frozen=True)
class TaskConfig:
    """Local training of one task model on a client."""

    lr: float = 1e-2  # Adam, reset each round; small models on sparse data like a large step
    batch_size: int = 32  # users per step (the expected batch under Poisson sampling)
    local_epochs: int = 2  # passes over the client's users per round (1 lagged central by 25%)
    dim: int = 64  # embedding width
    negatives: int = 16  # uniform negatives per position (sampled softmax / BCE)


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy. ``mode='record'``: DP-SGD on every client (cross-silo)."""

    mode: str = "none"  # none | record | user
    epsilon: float = 8.0  # per-client budget over all tasks and rounds
    delta: float = 1e-3  # must stay below 1 / (users of the smallest client)
    clipping_norm: float = 1.0  # per-user gradient clip (record) or update clip (user)
    clipping_side: str = "server"  # user-level: server clips replies, or client clips its own
    # user-level: a fixed norm, or adaptive (Andrew et al. 2021): the norm starts at
    # clipping_norm and follows a quantile of the update norms, privately estimated each round
    clipping: str = "fixed"
    target_unclipped_quantile: float = 0.5  # adaptive: share of updates left unclipped (paper)
    clip_norm_lr: float = 0.2  # adaptive: geometric step of the norm per round (paper's 0.2)
    clipped_count_stddev: float = 0.0  # adaptive: count noise; 0 = clients per round / 20 (paper)
    accountant: str = "prv"  # opacus accountant used for calibration and the ledger
    secure_rng: bool = False  # cryptographically secure noise (slower); on for production
    task_shares: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)  # budget split over TASKS
    # record-level: where the DP-SGD noise is added. local: each client's local training is
    # DP on its own (several steps per round, full noise per client). distributed: one DP-SGD
    # step per task per round; each client adds 1/min_contributors of the noise variance and
    # secure aggregation releases only the sum, which carries the full noise (the server runs
    # Adam on it: strategy fedadam). Same guarantee per client against a server that sees
    # only sums, about sqrt(clients) times less noise in the model (docs/distributed-dp.md).
    noise: str = "local"
    # distributed: the noise adds up to the full multiplier over at least this many clients;
    # clients refuse to unmask a round with fewer (the secure-aggregation threshold is raised
    # to it). 0 = a strict majority of the clients each round samples (resolved before the run
    # starts by `fedrec simulate` and `fedrec server run`: config.with_contributors)
    min_contributors: int = 0
    sample_rate: float = 0.25  # distributed: Poisson rate of users per step, the same everywhere
    # fusion_fit = "dp": noise multiplier of the one Gaussian release of the candidates'
    # validation NDCG sums; every client's calibration sets its cost aside (server/dp_fusion.py)
    fusion_noise: float = 8.0

    @property
    def distributed(self) -> bool:
        """Record-level DP-SGD whose noise is shared by the clients (``noise = "distributed"``)."""
        return self.mode == "record" and self.noise == "distributed"

    @property
    def noise_contributors(self) -> int:
        """The fewest clients whose noise shares a released sum must hold; 0 for local noise."""
        return self.min_contributors if self.distributed else 0


@dataclass(frozen=True)
class TextConfig:
    """Item text through a frozen public encoder (fedrec.text): features that cost no privacy."""

    # off | beside (text projection beside the item-ID embedding) | instead (of the ID, in recall
    # and ranking) | content (all three tasks as small linear models over the text: the choice
    # under DP, see fedrec.models.content)
    mode: str = "off"
    model: str = ""  # a local Hugging Face model folder; empty = all-MiniLM-L6-v2 (fedrec[text])
    max_tokens: int = 64  # titles plus genres are short; longer texts are cut (with a warning)
    # a LoRA adapter file from `fedrec text adapt` applied to the encoder; empty = none. Its
    # privacy cost is in the ledger of the run that trained it (docs/text-adapters.md)
    adapter: str = ""


@dataclass(frozen=True)
class FedrecConfig:
    """A whole run: data, federation, tasks, privacy."""

    dataset: str = "ml-100k"  # name (ml-100k, synthetic[:k=v,...]) or a path
    partition: str = "column:occupation"  # column:NAME | site | user | dirichlet:ALPHA
    clients: int = 0  # for dirichlet partitions; 0 = decided by the partition
    rounds: int = 12  # federated rounds (the default run's federation: about 7 minutes on 2 cores)
    seed: int = 0
    strategy: str = "fedavg"
    fraction_train: float = 1.0  # share of clients sampled per round
    min_train_clients: int = 2  # a round needs at least this many replies
    round_timeout: float = 3600.0  # seconds a round waits for replies; later ones are dropped
    # norm rule: an update over this x the norm predicted for it (norm_reference; 0 off). The
    # default 3 is 2.3x above the largest honest update measured on the default federation
    # (1.32x its prediction: strategies/screen.py); under user-level DP at least 10
    reject_norm_factor: float = 3.0
    # the norm predicted for a client's update: "size", fitted to the round's updates as a power
    # of the users each trained on (a large silo takes more steps); "median": the round's
    # median norm, the same for every client (strategies/screen.py)
    norm_reference: str = "size"
    # reject an update whose cosine with the coordinate-wise median of the round's other updates
    # is below this (-1 off): catches sign-flipped updates, whose norm is honest. Off under DP:
    # record-level noise leaves no shared direction, and under user-level DP clipping bounds
    # each update while a rejection skips the round (strategies/screen.py)
    reject_min_cosine: float = 0.0
    # what happens to an update over the norm rule: "rescale" scales it down to its predicted
    # norm, keeping its direction and its client's data (FLAME's bound, Nguyen et al. 2022);
    # "reject" drops it. Rescaling recovered most of what rejecting x10 updates lost (README,
    # benchmarks/robust_aggregation.py); a rescaled update still faces the direction rule
    norm_outliers: str = "rescale"
    # what happens to a task update under the direction rule: "reflect" keeps the task's
    # update negated when it is clearly a flip (reflect_min_cosine; never in round 1), so a
    # sign-flipped update brings its client's data back, and rejects the reply otherwise;
    # "reject" drops every such reply. Moot under DP and secure aggregation, where the rule is
    # off. Colluders steering the median and the global model's last step can get an honest
    # update reflected, late in training and small silos only in what was measured
    # (strategies/screen.py; benchmarks/update_cosines.py --steer)
    direction_outliers: str = "reflect"
    # under "reflect", a task update is kept negated only when its negation's cosine with the
    # others' median, and with the global model's last step, is at least this (and the update
    # is below reject_min_cosine against the median of all replies too); otherwise the reply
    # is rejected, as every one is in round 1 (no last step yet). A sign-flipped update sits
    # at minus its honest cosine (-0.06 to -0.7 on ML-100K over 12 rounds); two colluders of 21
    # steering the median pushed no honest update below -0.03 in rounds 1-6, but to -0.23 by
    # round 12 (strategies/screen.py, benchmarks/update_cosines.py --steer)
    reflect_min_cosine: float = 0.1
    # a reply's FedAvg weight (the users it reports) above this x the round's median weight is
    # lowered to it (0 off): FedAvg trusts the weight a client states, so one client claiming a
    # million users would otherwise own the average. The largest honest ML-100K silo is 7.0x the
    # median (196 of 28 users); near-equal or synthetic silos 1.3-1.7x (strategies/screen.py)
    max_weight_factor: float = 10.0
    # simulation only: the platform registers each client's user count (its partition's), as
    # `fedrec certs set-users` does for a partner site, and a reply stating more users than its
    # client's count is weighed at the count, before the relative cap (simulation/registry.py)
    register_users: bool = False
    proximal_mu: float = 0.01  # FedProx only
    server_lr: float = 0.01  # FedAdam only
    server_momentum: float = 0.5  # FedAvgM only (Hsu et al. 2019), server learning rate 1
    max_len: int = 50  # history length the models see
    eval_full_ranking: bool = True  # also rank the whole catalogue in the final evaluation
    # how the fusion weights are chosen: "server" fits them on its validation users,
    # "federated" on the clients' (they return NDCG sums only), "fixed" takes equal weights
    # over the task models and looks at no data, "dp" chooses among the task models and their
    # average by one Gaussian release of their validation NDCG sums, in every client's ledger
    # (record-level DP, simulation: server/dp_fusion.py). "auto": "server" without DP, "dp"
    # under record-level DP, "fixed" under user-level DP: a fit on users' data outside the
    # ledger would be a release no DP mechanism covers (set "server" or "federated" to fit
    # anyway: the run then says so, and so does the audit)
    fusion_fit: str = "auto"
    # content: fusion may also weigh an untrained content scorer over public item text (no
    # budget; fedrec.fusion.prior); none: the task models only
    fusion_prior: str = "content"
    secure_aggregation: bool = False  # the server learns only the sum of each round's updates
    out: str = ""  # run directory; empty = runs/<kind>-<dataset>-<time>
    tasks: Mapping[str, TaskConfig] = field(
        default_factory=lambda: {
            # Recall and ranking need more local passes than SASRec: with 2 epochs of batch 32
            # they reached 76% and 80% of central HR@10; 4 epochs of batch 16 give 86% and 94%
            # (benchmarks/federated_vs_central.py, README). SASRec is at 97% either way. Recall
            # gains from 8 (in-process emulation, validation HR@10 after 12 rounds: 0.615 -> 0.667
            # federated; central 0.719 -> 0.701, which 96 epochs slightly overfit).
            "recall": TaskConfig(batch_size=16, local_epochs=8),
            "ranking": TaskConfig(batch_size=16, local_epochs=4, negatives=8),  # BCE: few needed
            "personal": TaskConfig(negatives=32),
        }
    )
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    text: TextConfig = field(default_factory=TextConfig)

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key, default in SET_ONLY.items():
            if data[key] == default:
                del data[key]
        data["tasks"] = {name: dataclasses.asdict(t) for name, t in self.tasks.items()}
        data["privacy"]["task_shares"] = list(self.privacy.task_shares)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_toml(self) -> str:
        return _to_toml(self.to_dict())


def fusion_fit_mode(cfg: FedrecConfig) -> str:
    """``cfg.fusion_fit`` with "auto" resolved: "server" without DP, "dp" under record-level
    DP, "fixed" under user-level DP."""
    if cfg.fusion_fit != "auto":
        return cfg.fusion_fit
    return {"none": "server", "record": "dp"}.get(cfg.privacy.mode, "fixed")


def fusion_reserve(cfg: FedrecConfig) -> list[tuple[float, float, int]]:
    """The release a client's calibration sets aside for the DP fusion fit, as an accountant
    history item (noise multiplier, sample rate 1, one step); empty unless it is on."""
    if fusion_fit_mode(cfg) != "dp":
        return []
    return [(cfg.privacy.fusion_noise, 1.0, 1)]


def releases_outside_ledger(cfg: FedrecConfig) -> list[str]:
    """What a DP run with ``cfg`` releases from its users' data, in the model it ships or to
    the server, that no ledgered DP mechanism covers (empty without DP, and for the default
    fusion under DP). Evaluation figures (validation and test metrics of a simulation, computed
    where the data scientist holds the data) are reports, not releases, and are not listed."""
    if cfg.privacy.mode == "none":
        return []
    return {
        "server": ["fusion weights fitted on the validation users' held-out items "
                   "(fusion_fit = server): not differentially private"],
        "federated": ["each client's NDCG sums over its validation users, and the fusion "
                      "weights chosen from them (fusion_fit = federated): not differentially "
                      "private"],
    }.get(fusion_fit_mode(cfg), [])  # fmt: skip


def _validate(cfg: FedrecConfig) -> None:
    checks = [
        (cfg.rounds >= 1, "rounds", "must be at least 1"),
        (cfg.clients >= 0, "clients", "must be positive (or 0 to let the partition decide)"),
        (0 < cfg.fraction_train <= 1, "fraction_train", "must be in (0, 1]"),
        (cfg.min_train_clients >= 1, "min_train_clients", "must be at least 1"),
        (cfg.round_timeout > 0, "round_timeout", "must be positive (seconds)"),
        (cfg.reject_norm_factor == 0 or cfg.reject_norm_factor > 1, "reject_norm_factor",
         "must be above 1 (or 0 to turn the norm check off)"),
        (-1 <= cfg.reject_min_cosine < 1, "reject_min_cosine",
         "must be in [-1, 1) (-1 turns the direction check off)"),
        (cfg.norm_outliers in ("reject", "rescale"), "norm_outliers",
         "must be reject or rescale"),
        (cfg.norm_reference in ("size", "median"), "norm_reference", "must be size or median"),
        (cfg.direction_outliers in DIRECTION_OUTLIERS, "direction_outliers",
         f"must be one of {', '.join(DIRECTION_OUTLIERS)}"),
        (0 <= cfg.reflect_min_cosine < 1, "reflect_min_cosine", "must be in [0, 1)"),
        (cfg.max_weight_factor == 0 or cfg.max_weight_factor > 1, "max_weight_factor",
         "must be above 1 (or 0 to leave the weights as the clients state them)"),
        (not (cfg.register_users and cfg.secure_aggregation), "register_users",
         "has no effect under secure aggregation (every survivor's reply holds the same mean)"),
        (not cfg.register_users or cfg.strategy in SUM_STRATEGIES, "register_users",
         f"caps FedAvg weights; strategy {cfg.strategy} weighs every reply alike"),
        (not cfg.register_users or cfg.privacy.mode != "user", "register_users",
         "has no effect under user-level DP (every reply's weight is 1)"),
        (cfg.strategy in STRATEGIES, "strategy", f"must be one of {', '.join(STRATEGIES)}"),
        (0 <= cfg.server_momentum < 1, "server_momentum", "must be in [0, 1)"),
        (cfg.max_len >= 2, "max_len", "must be at least 2"),
        (cfg.fusion_fit in FUSION_FITS, "fusion_fit", f"must be one of {', '.join(FUSION_FITS)}"),
        (cfg.fusion_prior in ("content", "none"), "fusion_prior", "must be content or none"),
        (cfg.fusion_fit != "dp" or cfg.privacy.mode == "record", "fusion_fit",
         "'dp' needs record-level DP (--epsilon): each client's calibration sets its cost aside"),
        (0.5 <= cfg.privacy.fusion_noise < math.inf, "privacy.fusion_noise",
         "must be at least 0.5 (and finite), e.g. 8"),
        (not cfg.secure_aggregation or cfg.strategy in SUM_STRATEGIES, "secure_aggregation",
         f"needs strategy {', '.join(SUM_STRATEGIES)}: robust aggregators "
         "need individual updates, which secure aggregation hides"),
        (not cfg.secure_aggregation or cfg.privacy.mode != "user", "secure_aggregation",
         "does not compose with user-level DP yet (Flower's wrappers clip individual updates); "
         "use record-level DP (--epsilon) with it"),
        (cfg.privacy.mode in PRIVACY_MODES, "privacy.mode", f"must be one of {PRIVACY_MODES}"),
        (0 < cfg.privacy.epsilon < math.inf, "privacy.epsilon", "must be positive and finite"),
        (cfg.privacy.noise in NOISE_PLACES, "privacy.noise",
         f"must be one of {', '.join(NOISE_PLACES)}"),
        (cfg.privacy.noise == "local" or cfg.privacy.mode == "record", "privacy.noise",
         "'distributed' is a form of record-level DP-SGD: set privacy.mode = 'record' (--epsilon)"),
        (cfg.privacy.noise == "local" or cfg.secure_aggregation, "privacy.noise",
         "'distributed' needs secure_aggregation = true: each client's share of the noise is "
         "too small to release its update in the clear"),
        (cfg.privacy.noise == "local" or cfg.strategy == "fedadam", "privacy.noise",
         "'distributed' needs strategy = 'fedadam': each round is one noisy gradient step, "
         "and the server's Adam takes it"),
        (cfg.privacy.min_contributors == 0 or cfg.privacy.min_contributors >= 2,
         "privacy.min_contributors", "must be at least 2 (or 0 for a majority of the clients)"),
        (0 < cfg.privacy.sample_rate <= 1, "privacy.sample_rate", "must be in (0, 1]"),
        (0 < cfg.privacy.delta < 1, "privacy.delta", "must be in (0, 1)"),
        (cfg.privacy.clipping_norm > 0, "privacy.clipping_norm", "must be positive"),
        (cfg.privacy.clipping_side in ("server", "client"), "privacy.clipping_side",
         "must be 'server' or 'client'"),
        (cfg.privacy.clipping in ("fixed", "adaptive"), "privacy.clipping",
         "must be 'fixed' or 'adaptive'"),
        (cfg.privacy.clipping == "fixed" or cfg.privacy.mode == "user", "privacy.clipping",
         "'adaptive' needs privacy.mode = 'user' (DP-FedAvg); record-level DP-SGD clips "
         "per-example gradients at privacy.clipping_norm"),
        (0 < cfg.privacy.target_unclipped_quantile < 1, "privacy.target_unclipped_quantile",
         "must be in (0, 1), e.g. 0.5 (the median update norm)"),
        (0 < cfg.privacy.clip_norm_lr < float("inf"), "privacy.clip_norm_lr",
         "must be positive and finite, e.g. 0.2"),
        (0 <= cfg.privacy.clipped_count_stddev < float("inf"), "privacy.clipped_count_stddev",
         "must be non-negative and finite (0 = clients per round / 20)"),
        (cfg.text.mode in TEXT_MODES, "text.mode", f"must be one of {', '.join(TEXT_MODES)}"),
        (3 <= cfg.text.max_tokens <= 512, "text.max_tokens", "must be in [3, 512]"),
        (set(cfg.tasks) <= set(TASKS) and cfg.tasks, "tasks", f"must be a subset of {TASKS}"),
    ]
    for name, task in cfg.tasks.items():
        checks += [
            (task.lr > 0, f"tasks.{name}.lr", "must be positive"),
            (task.batch_size >= 1, f"tasks.{name}.batch_size", "must be at least 1"),
            (task.local_epochs >= 1, f"tasks.{name}.local_epochs", "must be at least 1"),
            (task.dim >= 1, f"tasks.{name}.dim", "must be at least 1"),
            (task.negatives >= 1, f"tasks.{name}.negatives", "must be at least 1"),
        ]
    for ok, name, fix in checks:
        if not ok:
            raise ConfigError(f"config field '{name}' {fix}")


def from_dict(data: Mapping[str, Any]) -> FedrecConfig:
    """Build a config from nested plain data (TOML or JSON); unknown keys are errors."""
    data = {k.replace("-", "_"): v for k, v in _table(data, "the config").items()}
    _reject_unknown(data, FedrecConfig, "")
    kwargs = dict(data)
    if "tasks" in data:
        default_tasks = FedrecConfig().tasks
        tasks = {}
        for name, values in _table(data["tasks"], "tasks").items():
            if name not in TASKS:
                raise ConfigError(f"config field 'tasks.{name}' is not a task; use {TASKS}")
            values = {k.replace("-", "_"): v for k, v in _table(values, f"tasks.{name}").items()}
            _reject_unknown(values, TaskConfig, f"tasks.{name}.")
            _check_types(values, TaskConfig, f"tasks.{name}.")
            tasks[name] = replace(default_tasks.get(name, TaskConfig()), **values)
        kwargs["tasks"] = tasks
    if "privacy" in data:
        values = {k.replace("-", "_"): v for k, v in _table(data["privacy"], "privacy").items()}
        _reject_unknown(values, PrivacyConfig, "privacy.")
        if "task_shares" in values:
            shares = values["task_shares"]
            tasks = list(kwargs.get("tasks", FedrecConfig().tasks))  # paired in this order
            if not isinstance(shares, (list, tuple)) or len(shares) < len(tasks) or not all(
                _is_number(x) for x in shares
            ):  # the first len(tasks) pair with the run's tasks in order; the rest are unused
                raise ConfigError(f"config field 'privacy.task_shares' must be numbers, one per "
                                  f"task of the run in order {tasks}; got {shares!r}")
            values["task_shares"] = tuple(float(x) for x in shares)
        _check_types(values, PrivacyConfig, "privacy.")
        kwargs["privacy"] = PrivacyConfig(**values)
    if "text" in data:
        values = {k.replace("-", "_"): v for k, v in _table(data["text"], "text").items()}
        _reject_unknown(values, TextConfig, "text.")
        _check_types(values, TextConfig, "text.")
        kwargs["text"] = TextConfig(**values)
    _check_types({k: v for k, v in kwargs.items() if k not in ("tasks", "privacy", "text")},
                 FedrecConfig, "")  # fmt: skip
    try:
        return FedrecConfig(**kwargs)
    except TypeError as err:  # a wrongly typed value
        raise ConfigError(f"invalid config: {err}") from err


def _table(value: Any, name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"config field '{name}' must be a table ([{name}] in TOML), "
                          f"got {value!r}")  # fmt: skip
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_SCALARS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": ("a number", _is_number),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
}


def _check_types(values: Mapping[str, Any], cls: type, prefix: str) -> None:
    """Each value of a plain field (int, float, bool, str, or one of them or None) must be of
    that type: a TOML "false" is a truthy string, and 2.5 rounds is a crash much later."""
    hints = {f.name: str(f.type) for f in fields(cls)}
    for key, value in values.items():
        allowed = [t.strip() for t in hints.get(key, "").split("|")]
        if not allowed or not set(allowed) <= {*_SCALARS, "None"}:
            continue  # not a plain field: its own checks apply
        if value is None and "None" in allowed:
            continue
        if not any(_SCALARS[t][1](value) for t in allowed if t in _SCALARS):
            want = " or ".join(_SCALARS[t][0] for t in allowed if t in _SCALARS)
            raise ConfigError(f"config field '{prefix}{key}' must be {want}, got {value!r}")


def from_json(text: str) -> FedrecConfig:
    return from_dict(json.loads(text))


def load_config(
    path: str | Path | None, overrides: Mapping[str, Any] | None = None
) -> FedrecConfig:
    """Read a TOML file (optional) and apply flag overrides (dotted keys allowed: 'privacy.epsilon')."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found; pass an existing TOML file to --config")
        try:
            data = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{p}: not valid TOML ({err}); fix the file") from err
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return from_dict(data)


def _reject_unknown(data: Mapping[str, Any], cls: type, prefix: str) -> None:
    known = {f.name for f in fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(
                f"config field '{prefix}{key}' is unknown; known fields: {', '.join(sorted(known))}"
            )


def _to_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    scalars = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, Mapping)]
    lines = [f"[{prefix}]"] if prefix and scalars else []
    lines += scalars
    for key, value in data.items():
        if isinstance(value, Mapping):
            lines += ["", _to_toml(value, f"{prefix}.{key}" if prefix else key)]
    return "\n".join(lines).strip() + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)


def with_contributors(cfg: FedrecConfig, n_clients: int) -> FedrecConfig:
    """Distributed DP noise: ``privacy.min_contributors`` 0 becomes a strict majority of the
    clients a round samples; ConfigError if it exceeds them (no round could be unmasked). Run
    before a run starts, simulated or deployed: clients refuse 0 (client/privacy.py)."""
    p = cfg.privacy
    if not p.distributed:
        return cfg
    sampled = min(n_clients, max(int(n_clients * cfg.fraction_train), cfg.min_train_clients))
    m = p.min_contributors or sampled // 2 + 1
    if m > sampled or m < 2:
        raise ConfigError(
            f"privacy.min_contributors = {m} needs at least {max(m, 2)} clients in each round; "
            f"the partition gives {n_clients} and each round samples {sampled}"
        )
    return replace(cfg, privacy=replace(p, min_contributors=m))
