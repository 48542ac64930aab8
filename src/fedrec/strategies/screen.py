"""Screen client updates before aggregation: a malformed or absurd reply never reaches a strategy.

A reply is rejected (and logged with the client's node id and the reason) when

- it does not hold one ArrayRecord under ``arrays`` and one MetricRecord whose weight is a finite
  positive number (Flower's strategies would otherwise abort the whole round);
- its keys, shapes or dtypes (as declared and as decoded) differ from the global model the round
  sent (a kept reply's arrays are put in the global model's key order: strategies that work by
  position, FedAvgM's momentum, Krum's distances, Flower's DP wrappers, take the order of the
  first reply);
- any value is NaN or infinite;
- a metric is not a number, a count or time (``num-examples``, ``*-seconds``, ``*.steps``) is
  negative or not finite, or a loss is infinite (NaN is a loss no batch measured); its
  ``ledger`` record is not a list of lines (metrics only some replies carry are dropped from
  the kept replies: Flower's metric aggregation would otherwise abort the round);
- a task's update norm ``||w_client - w_global||`` is far above what an honest client sends:
  above the clipping norm when every honest client clips its whole update to it (user-level DP
  with client-side clipping), otherwise above ``norm_factor`` times the norm the round's
  well-formed replies (at least 3 of them) predict for its client. Record-level DP-SGD clips
  per-example gradients and Adam rescales every step, so there the clipping norm does not bound
  a client's update and the relative rule applies. The prediction (``norm_reference``):

  * ``"size"`` (the default): a client's update norm grows with its data, the more local steps
    it takes, about as ``users ** b``; ``b`` is fitted to the round's replies by Theil-Sen on
    (log users, log norm) (the median of the pairwise slopes, robust to a minority of
    outliers; clamped to [0, 1]) and the scale is the median of ``norm / users ** b``. On the
    default ML-100K federation every honest update was 0.71-1.32x its prediction in rounds 1-4
    (0.74-1.26x under DP-SGD noise of multiplier 4), against 0.54-3.55x the plain median,
    where the largest silo (196 users) sits at 2.2-3.6x (``benchmarks/update_cosines.py``);
  * ``"median"``: the round's median norm, the same for every client (also what ``"size"``
    gives when every reply reports the same number of users).

  ``users`` is the reply's ``num-examples``, as the client reports it: a prediction is capped
  at ``SIZE_CEILING`` (5) times the round's median norm, so a client that overstates its users
  raises its bound to at most 15x the median (the rule before was 10x), and the fit needs at
  least ``MIN_FOR_SLOPE`` (5) replies (fewer: the median). Under user-level DP the reference is
  always the median (there ``num-examples`` is not even the client's weight).
  Over the rule, the default ``norm_action="rescale"`` does not drop the update but scales that
  task's update down to the predicted norm, keeping its direction (FLAME's bound, Nguyen et al.
  2022, with a per-client reference instead of one median): an over-scaled update (an attacker
  multiplying an honest one, or a client with a far too large learning rate) still brings its
  client's data at about its honest magnitude, where rejecting it (``"reject"``) loses that
  data and rescaling to the plain median shrinks a large silo to a typical one;
- its weight (the users it reports, FedAvg's ``num-examples``) is above ``max_weight_factor``
  (10) times the round's median weight: the weight is lowered to that, not rejected (a large
  honest silo keeps most of its say). Flower's FedAvg averages with the weight a client states,
  so one client claiming a million users would own the average whatever its update; the largest
  honest ML-100K silo is 7.0x the median (196 of 28 users). Under user-level DP every weight
  must be exactly 1 (the noise is calibrated for an unweighted mean of clipped updates);
- a task's update points away from the round: its cosine with the coordinate-wise median of the
  round's *other* well-formed updates (at least 3 others) is below ``min_cosine``. Honest
  updates start from the same global model and learn the same items, so they agree with the
  others' median in direction even on non-IID silos (0.22 and above in rounds 1-3 on ML-100K's
  21 silos: docs/fault-tolerance.md); a flipped update sits at exactly minus its honest cosine,
  and the median, unlike the mean, is not pulled by a minority of such replies. The median of
  the others, not of all replies (``median_and_leave_one_out``): an update's own vote pulls the
  median towards it, which hid flipped updates among few replies and, under DP-SGD noise, was
  all the agreement honest updates showed. That noise leaves no shared direction (cosines
  -0.02 to 0.01 at noise multiplier 2 and 4), so ``make_screen`` turns the rule off under
  record-level DP; and under user-level DP, where clipping bounds each update's effect and a
  rejection skips the round for everyone. This is a filter before Flower's strategy, not one
  of its aggregators: FedMedian and FedTrimmedAvg weigh every silo alike and lose accuracy on
  uneven silos without any attacker, while FedAvg behind this screen keeps its weighting.
  ``direction_action="reflect"`` (the config's default) keeps each such task's update negated
  when it is clearly a flip (below), so a sign-flipped update brings its client's data back,
  and drops the reply otherwise; ``"reject"`` drops every such reply. For an
  attacker's own reply reflection grants nothing rejection denies: the negation of an update at
  cosine ``c`` is at ``-c`` against the same reference, which it could have sent as it is. But
  the median is shared: colluding clients can steer it until an honest update falls below the
  rule. Rejecting then drops that client's data for the round; reflecting would add it negated,
  at its full weight, which turns a silo against the model. Hence three conditions, in every
  task below the rule: a margin (the negation at cosine ``reflect_cosine`` or more); the update
  below the rule against the median of all replies too, where a pushed honest update's own vote
  holds it up and a flipped one's does not; and the negation at least ``reflect_cosine``
  aligned with the global model's last step (its move in the round before), which no reply of
  this round can steer. Otherwise the reply is rejected, and so is every reply below the rule
  when there is no last step (the first round, a round after one with no aggregate, the first
  round resumed from a checkpoint of an earlier fedrec). The first two hold early in training,
  not late: on ML-100K two colluders among 21 silos pushed no honest update below -0.03 in
  rounds 1-6, but silos holding 21-29% of the users to -0.1 or below in rounds 10-12. The last
  step is a steadier reference (honest updates at 0.053 or more with it over 12 rounds), but
  not out of reach: two colluders who knew a target's next update, steering the step the round
  before and the median in the round, could get small silos past all margins late (7-user
  silos from round 8, 7.8% of the users in round 12), never the largest
  (``benchmarks/update_cosines.py --steer``, docs/fault-tolerance.md). Moot under DP, where
  ``make_screen`` turns the rule off.

What is subtler than this (an attacker who stays close to the median in norm and direction) is
left to robust aggregation (FedMedian, FedTrimmedAvg, Krum): the screen only drops what no sane
aggregator should average.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict

from fedrec.config import DIRECTION_OUTLIERS, FedrecConfig
from fedrec.strategies.records import ARRAYS_KEY, LEDGER_KEY, SEP, ledger_entries, summed_metric
from fedrec.strategies.user_dp import UNIFORM_WEIGHT_KEY

log = logging.getLogger(__name__)

BOUND_SLACK = 1e-3  # relative float error allowed over a clipping bound
MIN_FOR_MEDIAN = 3  # fewer well-formed replies: the median is no reference
# the direction rule judges each reply against the median of the others: at least 3 of them
# (with 2, their "median" is their mean, which one attacker among 3 replies decides)
MIN_FOR_DIRECTION = MIN_FOR_MEDIAN + 1
MIN_FOR_SLOPE = 5  # fewer: one reply is in half the pairs of the fit; the median instead
# a size-predicted norm is at most this x the round's median: a client that overstates its
# users cannot buy a bound above norm_factor x this (15x the median at the default 3); the
# largest honest silo's prediction stays under 3.5x the median (benchmarks/update_cosines.py)
SIZE_CEILING = 5.0
# the direction rule's reference, recorded in each checkpoint (a run resumed under another one
# says so: server/checkpoint.py) and in the robust-aggregation benchmark's cached runs; before
# this reference, an update was judged against the median of all replies, its own included
DIRECTION_REFERENCE = "others-median"
# the rule for reflecting an update below the direction rule, recorded in each checkpoint: since
# this one, a flip's negation must be aligned with the global model's last step too (before it,
# "reflect" was opt-in and asked only the medians)
REFLECT_RULE = "last-step"

Rejection = tuple[int, str]  # (node id, reason)
NORM_ACTIONS = ("reject", "rescale")
NORM_REFERENCES = ("size", "median")
SIZE_KEY = "num-examples"  # the users a client trained on, in every fedrec client's reply


@dataclass(frozen=True)
class UpdateScreen:
    """Checks one round's replies against the global model the round sent."""

    weight_key: str = "num-examples"
    norm_bound: float | None = None  # the whole update's L2 norm may not exceed this
    norm_factor: float = 3.0  # over this x the predicted norm (0 turns the rule off)
    min_cosine: float = 0.0  # reject a task update less aligned with the median (-1: rule off)
    norm_action: str = "rescale"  # over the norm rule: rescale to the predicted norm, or reject
    norm_reference: str = "size"  # predicted norm: fitted on users (module doc), or the median
    max_weight_factor: float = 10.0  # a weight over this x the round's median is lowered (0 off)
    direction_action: str = "reject"  # under the direction rule: reject, or reflect (module doc)
    reflect_cosine: float = 0.1  # "reflect" keeps only a negation at least this aligned

    def __post_init__(self) -> None:
        if self.norm_bound is not None and not self.norm_bound > 0:
            raise ValueError("norm_bound must be positive (or None for no absolute bound).")
        if self.norm_factor != 0 and not self.norm_factor > 1:
            raise ValueError("norm_factor must be above 1, or 0 to turn the norm rule off.")
        if not -1 <= self.min_cosine < 1:
            raise ValueError("min_cosine must be in [-1, 1) (-1 turns the direction rule off).")
        if self.norm_action not in NORM_ACTIONS:
            raise ValueError(f"norm_action must be one of {', '.join(NORM_ACTIONS)}.")
        if self.norm_reference not in NORM_REFERENCES:
            raise ValueError(f"norm_reference must be one of {', '.join(NORM_REFERENCES)}.")
        if self.direction_action not in DIRECTION_OUTLIERS:
            raise ValueError(f"direction_action must be one of {', '.join(DIRECTION_OUTLIERS)}.")
        if not 0 <= self.reflect_cosine < 1:
            raise ValueError("reflect_cosine must be in [0, 1).")
        if self.max_weight_factor != 0 and not self.max_weight_factor > 1:
            raise ValueError("max_weight_factor must be above 1, or 0 to turn the cap off.")

    @property
    def may_reflect(self) -> bool:
        """Whether this screen can keep an update negated (and so needs the last step)."""
        return self.direction_action == "reflect" and self.min_cosine > -1

    def screen(
        self, sent: ArrayRecord, replies: Sequence[Message]
    ) -> tuple[list[Message], list[Rejection]]:
        """The replies to aggregate (error replies pass through) and the rejected ones."""
        kept, rejected, _ = self.screen_all(sent, replies)
        return kept, rejected

    def screen_all(
        self,
        sent: ArrayRecord,
        replies: Sequence[Message],
        registered: Mapping[int, int] | None = None,
        last_step: Mapping[str, np.ndarray] | None = None,
    ) -> tuple[list[Message], list[Rejection], list[Rejection]]:
        """Like :meth:`screen`, plus the replies rescaled to their predicted norm or whose weight
        was lowered (node, reason): these are among the kept ones, their content changed.
        ``registered``: {node id: the users registered for it}, a weight's first cap
        (``fedrec.deploy.registry``); the relative cap then applies to what is left.
        ``last_step``: {key: the global model's move in the round before}, which reflection
        needs (module doc); without it no update is reflected."""
        reference = {k: v.numpy() for k, v in sent.items()}
        kept: list[Message] = []
        rejected: list[Rejection] = []
        norms: dict[int, dict[str, float]] = {}
        sizes: dict[int, float] = {}
        for msg in replies:
            if msg.has_error():
                kept.append(msg)
                continue
            reason, task_norms = self.check(msg.content, reference)
            if reason is None:
                reason = self._over_bound(task_norms)
            if reason is None:
                kept.append(msg)
                norms[id(msg)] = task_norms
                sizes[id(msg)] = _size(msg.content)
            else:
                rejected.append((msg.metadata.src_node_id, reason))
        sound = [m for m in kept if id(m) in norms]
        # Flower aggregates a metric only if every reply has it (else the round aborts): keep
        # the names all sound replies share. Not a majority's names: colluders adding a name
        # would make an honest reply the odd one out. The weight is in every sound reply.
        common = frozenset.intersection(*map(_metric_names, sound)) if sound else frozenset()
        for msg in sound:
            record = next(iter(msg.content.metric_records.values()))
            for name in sorted(set(record) - common):
                del record[name]
        for msg in sound:  # the global model's key order (strategies may work by position)
            record = msg.content.array_records[ARRAYS_KEY]
            if list(record) != list(reference):
                msg.content[ARRAYS_KEY] = ArrayRecord({k: record[k] for k in reference})
        rescaled = self._cap_registered(sound, registered or {})
        for i, why in self._cap_weights(sound).items():
            rescaled[i] = "; ".join(filter(None, (rescaled.get(i), why)))
        if self.weight_key == SIZE_KEY:  # the norm rule predicts from the weight FedAvg will use
            sizes.update({i: _size(m.content) for m in kept if (i := id(m)) in rescaled})
        outliers = self._norm_outliers(norms, sizes)
        for msg in [m for m in kept if id(m) in outliers]:
            why = "; ".join(reason for reason, _ in outliers[id(msg)].values())
            if self.norm_action == "rescale":
                targets = {task: target for task, (_, target) in outliers[id(msg)].items()}
                norms[id(msg)] = {**norms[id(msg)], **_rescale(msg, reference, targets)}
                rescaled[id(msg)] = "; ".join(filter(None, (rescaled.get(id(msg)), why)))
                continue
            kept.remove(msg)
            # a lowered weight stays in the reason: it set the norm this update was held to
            why = "; ".join(filter(None, (rescaled.pop(id(msg), None), why)))
            rejected.append((msg.metadata.src_node_id, why))
            del norms[id(msg)]
        contrary = self._contrary(
            reference, [m for m in kept if id(m) in norms], norms, last_step
        )
        for msg in [m for m in kept if id(m) in contrary]:
            cosines = {t: c for t, (c, _, _) in contrary[id(msg)].items()}
            why = "; ".join(_contrary_reason(t, c, self.min_cosine) for t, c in cosines.items())
            if self.direction_action == "reflect":
                unclear = self._unclear_flip(contrary[id(msg)])
                if unclear is None:
                    _scale(msg, reference, dict.fromkeys(cosines, -1.0))
                    why += "; reflected (its negation is kept)"
                    rescaled[id(msg)] = "; ".join(filter(None, (rescaled.get(id(msg)), why)))
                    continue
                why += f"; not reflected: {unclear}"
            kept.remove(msg)
            if id(msg) in rescaled:  # keep the norm and weight findings in the one reason logged
                why += f" (after the screen adjusted it: {rescaled.pop(id(msg))})"
            rejected.append((msg.metadata.src_node_id, why))
        return kept, rejected, [
            (m.metadata.src_node_id, rescaled[id(m)]) for m in kept if id(m) in rescaled
        ]

    def _cap_registered(
        self, sound: list[Message], registered: Mapping[int, int]
    ) -> dict[int, str]:
        """Lower, in place, every weight above its node's registered user count to that count
        (FedAvg's weight only: under user-level DP every weight is 1); {id(reply): why}."""
        if self.weight_key != SIZE_KEY or not registered:
            return {}
        out: dict[int, str] = {}
        for msg in sound:
            count = registered.get(msg.metadata.src_node_id)
            record = next(iter(msg.content.metric_records.values()))
            weight = float(cast(float, record[self.weight_key]))
            if count is not None and weight > count:
                record[self.weight_key] = int(count) if isinstance(record[self.weight_key], int) \
                    else float(count)
                out[id(msg)] = (
                    f"weight '{self.weight_key}' {weight:g} lowered to {count} (the users "
                    "registered for it)"
                )
        return out

    def _cap_weights(self, sound: list[Message]) -> dict[int, str]:
        """Lower, in place, every weight above ``max_weight_factor`` x the median of ``sound``'s
        weights to that bound (at least ``MIN_FOR_MEDIAN`` replies); {id(reply): why}."""
        if self.max_weight_factor == 0 or len(sound) < MIN_FOR_MEDIAN:
            return {}
        records = [next(iter(m.content.metric_records.values())) for m in sound]
        weights = [float(cast(float, r[self.weight_key])) for r in records]
        median = float(np.median(weights))
        bound = self.max_weight_factor * median
        out: dict[int, str] = {}
        for msg, record, weight in zip(sound, records, weights, strict=True):
            if weight > bound:
                # an int stays an int (rounded down)
                record[self.weight_key] = int(bound) if isinstance(record[self.weight_key], int) \
                    else bound
                out[id(msg)] = (
                    f"weight '{self.weight_key}' {weight:g} lowered to {record[self.weight_key]:g}"
                    f" ({self.max_weight_factor:g}x the round's median weight {median:g})"
                )
        return out

    def check(
        self, content: RecordDict, reference: dict[str, np.ndarray]
    ) -> tuple[str | None, dict[str, float]]:
        """(reason, {}) for a malformed reply; (None, update norm per task) for a sound one."""
        reason = _records_problem(content, self.weight_key)
        if reason is not None:
            return reason, {}
        record = content.array_records[ARRAYS_KEY]
        if set(record) != set(reference):
            missing, extra = (
                sorted(set(reference) - set(record)),
                sorted(set(record) - set(reference)),
            )
            return f"wrong keys (missing {missing[:3]}, unexpected {extra[:3]})", {}
        squares: dict[str, float] = defaultdict(float)
        for key, ref in reference.items():
            arr = record[key]
            if arr.dtype != str(ref.dtype):
                return f"'{key}' has dtype {arr.dtype}, expected {ref.dtype}", {}
            if tuple(arr.shape) != ref.shape:
                return f"'{key}' has shape {tuple(arr.shape)}, expected {ref.shape}", {}
            try:
                values = arr.numpy()
            except Exception as err:  # undecodable bytes from a broken or hostile client
                return f"'{key}' cannot be decoded ({type(err).__name__})", {}
            if values.dtype != ref.dtype:  # the declared dtype is only a label
                return f"'{key}' decodes as {values.dtype}, expected {ref.dtype}", {}
            if values.shape != ref.shape:
                return f"'{key}' decodes to shape {values.shape}, expected {ref.shape}", {}
            if not np.isfinite(values).all():
                return f"'{key}' holds NaN or Inf", {}
            diff = values.astype(np.float64) - ref
            squares[key.split(SEP, 1)[0]] += float(np.dot(diff.ravel(), diff.ravel()))
        return None, {task: math.sqrt(s) for task, s in squares.items()}

    def _over_bound(self, task_norms: dict[str, float]) -> str | None:
        if self.norm_bound is None:
            return None
        total = math.sqrt(sum(n * n for n in task_norms.values()))
        if total > self.norm_bound * (1 + BOUND_SLACK):
            return f"update norm {total:.4g} exceeds the clipping bound {self.norm_bound:g}"
        return None

    def _norm_outliers(
        self, norms: dict[int, dict[str, float]], sizes: dict[int, float]
    ) -> dict[int, dict[str, tuple[str, float]]]:
        """{reply: {task over the norm rule: (reason, its predicted norm)}}."""
        if self.norm_factor == 0 or len(norms) < MIN_FOR_MEDIAN:
            return {}
        ids = list(norms)
        by_size = self.norm_reference == "size"
        out: dict[int, dict[str, tuple[str, float]]] = {}
        for task in sorted({t for n in norms.values() for t in n}):
            task_norms = np.array([norms[i].get(task, 0.0) for i in ids])
            predicted, slope = predicted_norms(
                task_norms, np.array([sizes[i] for i in ids]) if by_size else None
            )
            for msg_id, norm, pred in zip(ids, task_norms, predicted, strict=True):
                # a zero prediction (most of the round sent no movement) bounds at zero: any
                # movement is then over it and is rescaled to nothing or rejected
                if norm > self.norm_factor * pred:
                    what = (f"the {pred:.4g} predicted for its {sizes[msg_id]:g} users (norm ~ "
                            f"users^{slope:.2f}, at most {SIZE_CEILING:g}x the round's median)"
                            if slope else f"the round's median {pred:.4g}")  # fmt: skip
                    out.setdefault(msg_id, {})[task] = (
                        f"'{task}' update norm {norm:.4g} is over {self.norm_factor:g}x {what}",
                        float(pred),
                    )
        return out

    def _unclear_flip(self, tasks: Mapping[str, tuple[float, float, float | None]]) -> str | None:
        """Why a reply below the direction rule is not clearly a flip, which reflection keeps
        negated (None: it is). ``tasks``: {task: (cosine with the others' median, with the
        median of all replies, with the global model's last step or None)} of each task below
        the rule. Clearly a flip, in every such task: the negation at least ``reflect_cosine``
        aligned with the others' median (and passing the rule); the update below the rule
        against the median of all replies too (an honest update that colluders push is held up
        by its own vote there); and the negation at least ``reflect_cosine`` aligned with the
        global model's last step, which no reply of this round can move (module doc)."""
        margin = max(self.min_cosine, self.reflect_cosine)
        for task, (c, c_all, c_step) in tasks.items():
            if -c < margin:
                return f"'{task}' negated would have cosine {-c:.3f}, under {margin:g}"
            if c_all >= self.min_cosine:
                return (f"'{task}' has cosine {c_all:.3f} with the median of all updates, its own "
                        "included (not below the rule)")
            if c_step is None:
                return ("no last step of the global model to compare it with (the first round, "
                        "a round after one with no aggregate, or the first after resuming from "
                        "a checkpoint of an earlier fedrec)")
            if -c_step < self.reflect_cosine:
                return (f"'{task}' negated has cosine {-c_step:.3f} with the global model's "
                        f"last step, under {self.reflect_cosine:g}")
        return None

    def _contrary(
        self,
        reference: dict[str, np.ndarray],
        sound: list[Message],
        norms: dict[int, dict[str, float]],
        last_step: Mapping[str, np.ndarray] | None = None,
    ) -> dict[int, dict[str, tuple[float, float, float | None]]]:
        """{reply: {task: (cosine, cosine_all, cosine_step)}} for every task in which a reply's
        update has ``cosine`` below ``min_cosine`` with the coordinate-wise median of the
        round's other updates; ``cosine_all``: with the median of all of them, its own
        included; ``cosine_step``: with ``last_step`` (None without one, or if it is 0)."""
        if self.min_cosine <= -1 or len(sound) < MIN_FOR_DIRECTION:
            return {}
        # per reply and task: <update, median of the others>, |that median|^2, the same with
        # the median of all updates, and with the last step
        sums: list[dict[str, np.ndarray]] = [defaultdict(lambda: np.zeros(6)) for _ in sound]
        for key, ref in reference.items():
            task = key.split(SEP, 1)[0]
            updates = np.stack(
                [m.content.array_records[ARRAYS_KEY][key].numpy().astype(np.float64).ravel()
                 for m in sound]
            ) - ref.astype(np.float64).ravel()
            median, medians = median_and_leave_one_out(updates)
            median_sq = float(median @ median)
            moved = None if last_step is None else last_step.get(key)
            step = np.zeros(0) if moved is None else np.asarray(moved, np.float64).ravel()
            step_sq = float(step @ step) if step.size else 0.0
            for update, others, acc in zip(updates, medians, sums, strict=True):
                acc[task] += (update @ others, others @ others, update @ median, median_sq,
                              update @ step if step.size else 0.0, step_sq)  # fmt: skip
        out: dict[int, dict[str, tuple[float, float, float | None]]] = {}
        for msg, acc in zip(sound, sums, strict=True):
            for task, (dot, sq, dot_all, sq_all, dot_step, sq_step) in sorted(acc.items()):
                norm = norms[id(msg)].get(task, 0.0)
                # no movement points nowhere
                cosine = dot / (norm * math.sqrt(sq)) if norm * sq > 0 else 1.0
                cosine_all = dot_all / (norm * math.sqrt(sq_all)) if norm * sq_all > 0 else 1.0
                # a global model that did not move (a round with no aggregate) is no reference
                cosine_step = dot_step / (norm * math.sqrt(sq_step)) if norm * sq_step > 0 \
                    else None
                if cosine < self.min_cosine:
                    out.setdefault(id(msg), {})[task] = (cosine, cosine_all, cosine_step)
        return out


def median_and_leave_one_out(updates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Float[P] the coordinate-wise median of ``updates`` (Float[n, P], n >= 2), Float[n, P]
    whose row i is that median without row i), both as ``np.median`` takes them (the mean of
    the two middle values of an even count), from one partition.

    Why not the median of all rows: with a few replies an update's own vote moves the median
    towards it, so a flipped update agrees with a median it helped make. On 5 synthetic silos
    a flipped update's cosine was +0.04 where its honest one's was +0.56 (recall); judged
    against the others only, the negation of an update at cosine c is at exactly -c."""
    # Removing row i shifts the middle of each column by one place or not at all, so the two
    # or three middle order statistics (np.partition, not a full sort) and a comparison of row
    # i's value with them give its median; a tie picks equal values either way.
    h = (len(updates) - 1) // 2
    if len(updates) % 2 == 0:  # an odd number of others: their middle value
        part = np.partition(updates, (h, h + 1), axis=0)
        low, high = part[h], part[h + 1]
        return (low + high) / 2, np.where(updates <= low, high, low)
    part = np.partition(updates, (h - 1, h, h + 1), axis=0)
    a, b, c = part[h - 1], part[h], part[h + 1]
    # without a value at or below a the middle pair is (b, c); at or above c, (a, b); else (a, c)
    others = np.where(updates <= a, (b + c) / 2, np.where(updates >= c, (a + b) / 2, (a + c) / 2))
    return b, others


def predicted_norms(
    norms: np.ndarray, sizes: np.ndarray | None = None
) -> tuple[np.ndarray, float]:
    """(the norm each update is expected to have, ``b``): ``scale * sizes ** b``, ``b`` the
    Theil-Sen slope of log norm on log size (pairs of different sizes and positive norms;
    clamped to [0, 1]) and ``scale`` the median of ``norms / sizes ** b``, each at most
    ``SIZE_CEILING`` x the median norm; the plain median of ``norms`` for every update when
    ``sizes`` is None, there are fewer than ``MIN_FOR_SLOPE`` updates, or no slope (module
    doc)."""
    norms = np.asarray(norms, dtype=np.float64)
    slope = 0.0
    if sizes is not None and len(norms) >= MIN_FOR_SLOPE:
        sizes = np.asarray(sizes, dtype=np.float64)
        ok = norms > 0
        x, y = np.log(sizes[ok]), np.log(norms[ok])
        i, j = np.triu_indices(len(x), 1)
        pairs = x[i] != x[j]
        if pairs.any():
            slope = float(np.clip(np.median((y[j] - y[i])[pairs] / (x[j] - x[i])[pairs]), 0, 1))
    median = float(np.median(norms))
    if slope == 0.0:
        return np.full(norms.shape, median), 0.0
    scaled = sizes**slope
    return np.minimum(float(np.median(norms / scaled)) * scaled, SIZE_CEILING * median), slope


def _size(content: RecordDict) -> float:
    """The users the reply says it trained on (its FedAvg weight); 1 if it does not say."""
    value = next(iter(content.metric_records.values())).get(SIZE_KEY, 1)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if ok and _finite(value) and value > 0 else 1.0


def _rescale(
    msg: Message, reference: dict[str, np.ndarray], targets: dict[str, float]
) -> dict[str, float]:
    """Scale ``msg``'s update of each task in ``targets`` down to that task's target norm (its
    predicted norm), in place; the other tasks are left as sent. Returns the rescaled tasks'
    norms (their targets)."""
    record = msg.content.array_records[ARRAYS_KEY]
    current: dict[str, float] = defaultdict(float)
    for key in record:
        task = key.split(SEP, 1)[0]
        if task in targets:
            diff = record[key].numpy().astype(np.float64) - reference[key]
            current[task] += float(np.dot(diff.ravel(), diff.ravel()))
    factors = {t: targets[t] / math.sqrt(sq) for t, sq in current.items() if sq > 0}
    _scale(msg, reference, factors)
    return {task: targets[task] for task in factors}


def _scale(msg: Message, reference: dict[str, np.ndarray], factors: dict[str, float]) -> None:
    """Multiply ``msg``'s update (its arrays minus ``reference``) of each task in ``factors`` by
    that factor, in place, in each array's own dtype and key order (-1 reflects it)."""
    record = msg.content.array_records[ARRAYS_KEY]
    arrays = {}
    for key in record:
        values, ref = record[key].numpy(), reference[key]
        s = factors.get(key.split(SEP, 1)[0])
        if s is not None:
            values = np.asarray(ref + s * (values.astype(np.float64) - ref), dtype=values.dtype)
        arrays[key] = Array(values)
    msg.content[ARRAYS_KEY] = ArrayRecord(arrays)


def _contrary_reason(task: str, cosine: float, min_cosine: float) -> str:
    return (f"'{task}' update has cosine {cosine:.3f} with the median of the other updates "
            f"(below {min_cosine:g}): it points away from the other clients'")


def _records_problem(content: RecordDict, weight_key: str) -> str | None:
    if list(content.array_records) != [ARRAYS_KEY]:
        return f"expected one ArrayRecord '{ARRAYS_KEY}', got {sorted(content.array_records)}"
    if len(content.metric_records) != 1:
        return f"expected one MetricRecord, got {len(content.metric_records)}"
    weight = next(iter(content.metric_records.values())).get(weight_key)
    if (
        isinstance(weight, bool)
        or not isinstance(weight, (int, float))
        or not _finite(weight)
        or weight <= 0
    ):
        return f"weight '{weight_key}' is {weight!r}, not a finite positive number"
    if weight_key == UNIFORM_WEIGHT_KEY and weight != 1:
        return (f"weight '{weight_key}' is {weight!r}, not 1: under user-level DP the noise is "
                "calibrated for an unweighted mean of the clipped updates")
    for key, value in next(iter(content.metric_records.values())).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"metric '{key}' is {type(value).__name__}, not a number"
        summed = summed_metric(key)
        if (summed and not (_finite(value) and value >= 0)) or (
            not summed and value in (math.inf, -math.inf)
        ):
            return f"metric '{key}' is {value!r}"
    if LEDGER_KEY in content:
        entries = ledger_entries(content)
        if entries is None or not all(isinstance(e, str) for e in entries):
            return "its 'ledger' record is not a list of ledger lines"
    return None


def _metric_names(msg: Message) -> frozenset[str]:
    return frozenset(next(iter(msg.content.metric_records.values())))


def _finite(value: float) -> bool:
    """``math.isfinite``, False for an int too large for a float (which it raises on)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def direction_rule_on(cfg: FedrecConfig) -> bool:
    """Whether the direction rule can act in a run: switched on (``reject_min_cosine`` above
    -1), without DP (``make_screen`` turns it off there), and without secure aggregation (the
    server sees only the sum of the updates)."""
    return cfg.reject_min_cosine > -1 and cfg.privacy.mode == "none" and not cfg.secure_aggregation


def make_screen(cfg: FedrecConfig) -> UpdateScreen:
    """The screen for a run: an absolute bound only where honest clients clip their updates."""
    p = cfg.privacy
    user = p.mode == "user"
    if p.mode != "none" and cfg.reject_min_cosine not in (0.0, -1.0):
        log.warning(
            "reject_min_cosine = %g is ignored: the direction rule is off under differential "
            "privacy (privacy.mode = %s)", cfg.reject_min_cosine, p.mode,
        )
    return UpdateScreen(
        weight_key=UNIFORM_WEIGHT_KEY if user else "num-examples",
        norm_bound=p.clipping_norm if user and p.clipping_side == "client" else None,
        # User-level DP: a rejected reply makes Flower's DP wrapper skip the round, and the
        # clipping bounds every user's influence anyway, so there the rule only catches absurd
        # updates (at least 10x, as before the size reference existed)
        norm_factor=max(cfg.reject_norm_factor, 10.0) if user and cfg.reject_norm_factor
        else cfg.reject_norm_factor,
        # The direction rule is off under DP. Record-level DP-SGD noise leaves an update no
        # direction the others share: at noise multiplier 4 honest updates' cosines with the
        # others' median were -0.02 to 0.01, so the rule would drop honest replies at random and
        # cannot tell a flipped one (module doc). Under user-level DP the clipping bounds what
        # any one update, flipped or not, does to the release, and a rejected reply makes
        # Flower's DP wrapper skip the round for everyone: on small federations, where honest
        # updates agree with the others' median at cosines near 0, that skipped whole rounds
        min_cosine=-1.0 if p.mode != "none" else cfg.reject_min_cosine,
        # User-level DP bounds each user's influence on the release by the clipping norm; a
        # rescale to a norm predicted from the other updates would let one user's update change
        # how much of *other* users' updates enters it, so there norm outliers are rejected.
        norm_action="reject" if user else cfg.norm_outliers,
        norm_reference="median" if user else cfg.norm_reference,  # sizes are not weights there
        direction_action=cfg.direction_outliers,  # moot where min_cosine is -1 (DP)
        reflect_cosine=cfg.reflect_min_cosine,
        max_weight_factor=cfg.max_weight_factor,  # moot under user-level DP: every weight is 1
    )
