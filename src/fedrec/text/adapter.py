"""LoRA adapters on the frozen text encoder, fine-tuned on a client's users under DP-SGD.

LoRA (Hu et al., ICLR 2022): an adapted projection computes ``W x + (alpha / r) B A x``; the
pretrained ``W`` stays frozen (and public), ``B`` starts at zero so the adapted encoder equals
the frozen one until trained, and only ``A`` and ``B`` train and travel (:func:`adapter_state`).

The objective adapts the text space to the site's catalogue: the mean of a user's history
texts should score their next item's text above K sampled items' texts (a sampled softmax on
cosine similarities; the in-user analogue of sentence-transformers' MultipleNegativesRankingLoss).

Under DP the example is a user. All texts a step encodes for one user (history, next item,
negatives) form that user's group of G rows, and each adapter folds its token batch
(users*G, T, d) into (users, G*T, d) before A and B. A linear layer's gradient is a sum over
the positions of a batch row and rows of a transformer never interact, so Opacus's per-sample
gradients of A and B are exactly per-user gradients: per-user clipping is exact. We use Opacus's
GradSampleModuleFastGradientClipping and DPOptimizerFastGradientClipping (with its two backward
passes; fedrec.training's task models clip in one: fedrec.clipping) with
``use_ghost_clipping=False`` by default: a ghost norm over a sequence costs
O(users * (G*T)^2 * d) while a rank-r adapter's per-user gradient has only r*d entries, so
fast gradient clipping (Lee & Kifer, PETS 2021) is the cheaper exact choice here. The base
encoder runs in eval mode (no dropout), so a step is a deterministic function of its batch.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from fedrec.dp_noise import dp_optimizer
from fedrec.text.encoder import mean_pool
from fedrec.text.items import TextError, clean_texts, first_indices
from fedrec.training import DPSGDParams, TrainStats, noise_only_step, poisson_sampler

log = logging.getLogger(__name__)

LORA_TARGETS = ("query", "value")  # Hu et al. adapt W_q and W_v
LAYER_LISTS = ("layer", "layers")  # the ModuleList holding the transformer blocks
History = Sequence[int] | np.ndarray  # one user's item indices in time order


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) * lora_b(lora_a(x))``; ``base`` frozen, ``lora_b`` zero at start.

    ``group`` > 1 folds x (N, T, d) into (N / group, group * T, d) for A and B, so each of their
    batch rows holds one DP example's texts (see the module docstring).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, gen: torch.Generator) -> None:
        super().__init__()
        self.base = base
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Linear(base.in_features, rank, bias=False, **like)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False, **like)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5), generator=gen)  # as loralib
        nn.init.zeros_(self.lora_b.weight)
        self.scaling = alpha / rank
        self.group = 1

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        if n % self.group:
            raise ValueError(f"batch of {n} rows does not split into groups of {self.group}")
        folded = x.reshape(n // self.group, -1, x.shape[-1])  # (U, G*T, d)
        delta = self.lora_b(self.lora_a(folded)).reshape(*x.shape[:-1], -1)  # (N, T, d')
        return self.base(x) + self.scaling * delta


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA-wrapped projections by module name (empty before :func:`add_lora`)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_parameters(model: nn.Module) -> dict[str, Tensor]:
    """The adapter weights by parameter name: the only trainable parameters after add_lora."""
    out: dict[str, Tensor] = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_a.weight"] = m.lora_a.weight
        out[f"{name}.lora_b.weight"] = m.lora_b.weight
    return out


def _layer_list(model: nn.Module) -> nn.ModuleList:
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in LAYER_LISTS:
            return module
    raise ValueError(
        f"no transformer block list (a ModuleList named one of {LAYER_LISTS}) in "
        f"{type(model).__name__}; add_lora supports BERT-style Hugging Face encoders"
    )


def add_lora(
    model: nn.Module,
    *,
    layers: int = 2,
    rank: int = 4,
    alpha: float = 8.0,
    targets: tuple[str, ...] = LORA_TARGETS,
    seed: int = 0,
) -> list[str]:
    """Freeze ``model`` and wrap ``targets`` in its top ``layers`` blocks with LoRA, in place.

    ``A`` is drawn from ``seed``, so every party that calls this with the same arguments holds
    the same initial adapters. Returns the adapter parameter names (the adapter_state keys).
    """
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters; use load_adapter_state to set them")
    if rank < 1 or not alpha > 0:
        raise ValueError(f"rank must be >= 1 and alpha > 0, got rank={rank}, alpha={alpha}")
    blocks = _layer_list(model)
    if not 1 <= layers <= len(blocks):
        raise ValueError(f"layers must be between 1 and {len(blocks)}, got {layers}")
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    for block in list(blocks)[len(blocks) - layers :]:
        found = [
            (name, m)
            for name, m in block.named_modules()
            if name.rsplit(".", 1)[-1] in targets and isinstance(m, nn.Linear)
        ]
        if not found:
            raise ValueError(f"no nn.Linear named one of {targets} in the encoder's blocks")
        for name, m in found:
            parent, _, attr = name.rpartition(".")
            setattr(block.get_submodule(parent), attr, LoRALinear(m, rank, alpha, gen))
    return sorted(adapter_parameters(model))


def adapter_state(model: nn.Module) -> dict[str, np.ndarray]:
    """Copies of the adapter weights (float32 arrays): all a client sends for this task."""
    return {
        k: p.detach().cpu().float().numpy().copy() for k, p in adapter_parameters(model).items()
    }


def _few(names: list[str]) -> str:
    return (", ".join(names[:3]) + (", ..." if len(names) > 3 else "")) or "-"


def load_adapter_state(model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Set the adapters from ``state``; keys, shapes and finiteness are checked before any write."""
    params = adapter_parameters(model)
    if not params:
        raise ValueError("the model has no LoRA adapters; call add_lora as the sender did first")
    missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or extra:
        raise ValueError(
            f"adapter state does not match the model: missing {_few(missing)}; "
            f"unexpected {_few(extra)}; call add_lora with the sender's "
            "layers and targets"
        )
    values = {k: np.asarray(state[k]) for k in params}
    for k, p in params.items():
        if values[k].shape != tuple(p.shape):
            raise ValueError(
                f"adapter {k}: shape {values[k].shape}, the model expects {tuple(p.shape)}; "
                "call add_lora with the sender's rank"
            )
        if not np.all(np.isfinite(values[k])):
            raise ValueError(f"adapter {k}: non-finite values; refusing to load them")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(torch.as_tensor(values[k], dtype=p.dtype))


@contextmanager
def _grouped(model: nn.Module, group: int) -> Iterator[None]:
    mods = lora_modules(model).values()
    for m in mods:
        m.group = group
    try:
        yield
    finally:
        for m in mods:
            m.group = 1


@dataclass(frozen=True)
class AdapterTrainConfig:
    """One local fine-tuning call's settings (DP parameters come apart, as DPSGDParams)."""

    steps: int = 10  # optimizer steps; each one an accounted release under DP
    sample_rate: float = 0.05  # Poisson rate of users per step (fixed batch of q*n without DP)
    lr: float = 1e-3  # Adam on the adapters only
    negatives: int = 8  # K sampled items per user (sampled softmax)
    history: int = 10  # at most this many items before the target form the user's text
    temperature: float = 0.05  # on cosine scores: sentence-transformers' scale of 20
    max_tokens: int = 32  # titles are short; longer texts are truncated
    ghost_clipping: bool = False  # see the module docstring for why off is cheaper here

    def __post_init__(self) -> None:
        checks = {
            "steps": self.steps >= 1,
            "sample_rate": 0 < self.sample_rate <= 1,
            "lr": self.lr > 0,
            "negatives": self.negatives >= 1,
            "history": self.history >= 1,
            "temperature": self.temperature > 0,
            "max_tokens": self.max_tokens >= 3,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"AdapterTrainConfig: invalid {', '.join(bad)} (see field comments)")


@dataclass(frozen=True)
class ItemTokens:
    """The catalogue's texts, tokenized once: rows are item indices."""

    ids: Tensor  # int64 (I, max_tokens)
    mask: Tensor  # int64 (I, max_tokens)
    has_text: np.ndarray  # bool (I,): items without text are never encoded


def tokenize_items(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str | bytes | None],
    *,
    max_tokens: int = 32,
) -> ItemTokens:
    """Token ids of every item text; missing or blank texts are flagged and counted in a warning."""
    has_text = np.array([isinstance(t, str | bytes) and bool(t.strip()) for t in texts], bool)
    if has_text.sum() < 2:
        raise TextError("fewer than 2 items have text; the contrastive objective needs more")
    if not has_text.all():
        warnings.warn(
            f"{int((~has_text).sum())} of {len(texts)} items have no text (indices "
            f"{first_indices(np.flatnonzero(~has_text).tolist())}); adapter training skips them",
            stacklevel=2,
        )
    clean = clean_texts([t for t, ok in zip(texts, has_text, strict=True) if ok])
    full = [""] * len(texts)
    for i, text in zip(np.flatnonzero(has_text), clean, strict=True):
        full[i] = text
    lengths = np.array([len(x) for x in tokenizer(full, verbose=False)["input_ids"]])
    if (long := int((lengths > max_tokens).sum())) > 0:
        log.info("%d of %d item texts truncated to %d tokens", long, len(texts), max_tokens)
    enc = tokenizer(
        full, padding="max_length", truncation=True, max_length=max_tokens, return_tensors="pt"
    )
    return ItemTokens(enc["input_ids"], enc["attention_mask"], has_text)


@dataclass(frozen=True)
class UserTextBatch:
    """One step's texts grouped per user: G = history + 1 (next item) + K rows each."""

    ids: Tensor  # int64 (U, G, T)
    mask: Tensor  # int64 (U, G, T)
    history_weight: Tensor  # float32 (U, history): 0 marks padding slots


class TextContrastive(nn.Module):
    """Per-user sampled-softmax loss of the next item's text against the history's mean text."""

    def __init__(self, encoder: nn.Module, *, history: int, temperature: float) -> None:
        super().__init__()
        self.encoder, self.history, self.temperature = encoder, history, temperature

    def forward(self, batch: UserTextBatch) -> Tensor:
        u, g, t = batch.ids.shape
        mask = batch.mask.reshape(u * g, t)
        with _grouped(self.encoder, g):
            hidden = self.encoder(input_ids=batch.ids.reshape(u * g, t), attention_mask=mask)
        emb = F.normalize(mean_pool(hidden.last_hidden_state, mask), dim=-1).reshape(u, g, -1)
        w = batch.history_weight.unsqueeze(-1)  # (U, H, 1)
        user = F.normalize((emb[:, : self.history] * w).sum(1) / w.sum(1), dim=-1)  # (U, D)
        logits = torch.einsum("ud,ucd->uc", user, emb[:, self.history :]) / self.temperature
        return F.cross_entropy(logits, logits.new_zeros(u, dtype=torch.long), reduction="none")


def _usable(histories: Sequence[History], has_text: np.ndarray) -> list[np.ndarray]:
    """Histories with textless items dropped; users left with fewer than 2 items are skipped."""
    out = []
    for seq in histories:
        arr = np.asarray(seq, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= has_text.size):
            raise ValueError(f"history item index out of range [0, {has_text.size})")
        arr = arr[has_text[arr]]
        if arr.size >= 2:
            out.append(arr)
    return out


class AdapterTrainer:
    """Adam on the adapters of ``model`` over ``histories``' users; DP-SGD when ``dp`` is given.

    ``histories`` are item-index sequences in time order, one per user. Users are the DP
    examples: Poisson sampling at ``cfg.sample_rate``, exact per-user clipping, Gaussian noise.
    Call :meth:`close` to remove Opacus's hooks.
    """

    def __init__(
        self,
        model: nn.Module,
        tokens: ItemTokens,
        histories: Sequence[History],
        cfg: AdapterTrainConfig,
        *,
        seed: int,
        dp: DPSGDParams | None = None,
    ) -> None:
        params = adapter_parameters(model)
        if not params:
            raise ValueError("the model has no LoRA adapters; call add_lora first")
        if sum(p.requires_grad for p in model.parameters()) != len(params):
            raise ValueError("parameters outside the adapters require grad; freeze them")
        self.histories = _usable(histories, tokens.has_text)
        if not self.histories:
            raise ValueError("no user has 2 or more items with text; nothing to train on")
        self.model, self.tokens, self.cfg, self.dp = model, tokens, cfg, dp
        self.pool = np.flatnonzero(tokens.has_text)
        self.pool_pos = np.cumsum(tokens.has_text) - 1  # item -> position in pool
        self.rng = np.random.default_rng(seed)
        # the Poisson sample under DP: OS entropy unless the noise is seeded (training.py)
        self.sampler = poisson_sampler(dp, self.rng) if dp is not None else self.rng
        self.objective = TextContrastive(model, history=cfg.history, temperature=cfg.temperature)
        self.optimizer: torch.optim.Optimizer = torch.optim.Adam(params.values(), lr=cfg.lr)
        model.eval()
        for m in lora_modules(model).values():
            m.train()  # Opacus only hooks modules in training mode
        self.gsm: Any = None  # Opacus's wrapper and optimizer under DP (untyped)
        self.dp_opt: Any = None
        if dp is not None:
            self._make_private(dp)

    @property
    def n_users(self) -> int:
        return len(self.histories)

    def _make_private(self, dp: DPSGDParams) -> None:
        from opacus.grad_sample import GradSampleModuleFastGradientClipping

        self.gsm = GradSampleModuleFastGradientClipping(
            self.objective,
            batch_first=True,
            loss_reduction="mean",
            max_grad_norm=dp.clipping_norm,
            use_ghost_clipping=self.cfg.ghost_clipping,
        )
        self.dp_opt = dp_optimizer(  # noise from a CSPRNG unless seeded (fedrec.dp_noise)
            self.optimizer,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.clipping_norm,
            expected_batch_size=max(1, round(self.cfg.sample_rate * self.n_users)),
            noise_seed=dp.noise_seed,
        )

    def make_batch(self, users: np.ndarray, rng: np.random.Generator) -> UserTextBatch:
        """Texts for ``users`` (indices into the usable histories): a random target per user."""
        h, k = self.cfg.history, self.cfg.negatives
        rows = np.empty((len(users), h + 1 + k), dtype=np.int64)
        weight = np.zeros((len(users), h), dtype=np.float32)
        for i, u in enumerate(users):
            seq = self.histories[u]
            t = int(rng.integers(1, seq.size))
            past = seq[max(0, t - h) : t]
            rows[i, : h + 1] = np.concatenate(
                [past, np.full(h - past.size, past[0]), seq[t : t + 1]]
            )
            weight[i, : past.size] = 1.0
        r = rng.integers(0, self.pool.size - 1, size=(len(users), k))
        r += r >= self.pool_pos[rows[:, h]][:, None]  # skip each user's positive
        rows[:, h + 1 :] = self.pool[r]
        mask = self.tokens.mask[rows]  # (U, G, max_tokens)
        t_max = int(mask.sum(-1).max())
        return UserTextBatch(
            self.tokens.ids[rows][..., :t_max], mask[..., :t_max], torch.from_numpy(weight)
        )

    def step(self) -> float | None:
        """One update on sampled users; None for an empty Poisson sample (a noise-only step)."""
        n = self.n_users
        if self.dp is None:
            users = self.rng.choice(n, size=max(1, round(self.cfg.sample_rate * n)), replace=False)
        else:
            users = np.flatnonzero(self.sampler.random(n) < self.cfg.sample_rate)
        return self.step_on(users)

    def step_on(self, users: np.ndarray) -> float | None:
        """One update on exactly ``users`` (benchmarks and tests; :meth:`step` samples them)."""
        if self.gsm is None or self.dp_opt is None:
            loss = self.objective(self.make_batch(users, self.rng)).mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            return float(loss.detach())
        from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

        self.dp_opt.zero_grad(set_to_none=True)
        if len(users) == 0:
            noise_only_step(self.model, self.dp_opt)
            return None
        # each user's target from the sampler's stream: secret whenever the noise is, since a
        # known stream handed out by position would tie a user's example to who else is in it
        per_user = self.gsm(self.make_batch(users, self.sampler))  # (U,)
        with warnings.catch_warnings():  # the first adapter's input is frozen: benign
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            DPTensorFastGradientClipping(self.gsm, self.dp_opt, per_user, "mean").backward()
        self.dp_opt.step()
        return float(per_user.detach().mean())

    def loss_on(self, users: np.ndarray, *, seed: int) -> float:
        """Mean loss of ``users`` on a batch drawn from ``seed``, without training."""
        with torch.no_grad():
            return float(self.objective(self.make_batch(users, np.random.default_rng(seed))).mean())

    def close(self) -> None:
        if self.gsm is not None:
            self.gsm._close()
            self.gsm = None
        self.model.eval()


def train_adapter(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    user_histories: Sequence[History],
    item_texts: Sequence[str | bytes | None],
    cfg: AdapterTrainConfig,
    *,
    seed: int,
    dp: DPSGDParams | None = None,
) -> TrainStats:
    """Fine-tune ``model``'s adapters (see :func:`add_lora`) in place for ``cfg.steps`` steps."""
    tokens = tokenize_items(tokenizer, item_texts, max_tokens=cfg.max_tokens)
    return run_steps(AdapterTrainer(model, tokens, user_histories, cfg, seed=seed, dp=dp), cfg)


def run_steps(trainer: AdapterTrainer, cfg: AdapterTrainConfig) -> TrainStats:
    """Run ``cfg.steps`` steps of ``trainer``, close it, and report what they did."""
    start = time.perf_counter()
    try:
        losses = [x for _ in range(cfg.steps) if (x := trainer.step()) is not None]
    finally:
        trainer.close()
    loss = float(np.mean(losses)) if losses else float("nan")
    if losses and not math.isfinite(loss):
        raise FloatingPointError(f"degenerate text-adapter loss {loss}")
    seconds = time.perf_counter() - start
    return TrainStats(loss, cfg.steps, cfg.sample_rate, trainer.n_users, seconds)
