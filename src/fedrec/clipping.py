"""Per-example gradient clipping in one backward pass: Opacus's norms, then book-keeping.

Opacus 1.6's ghost clipping (``GradSampleModuleFastGradientClipping`` with
``DPTensorFastGradientClipping``) runs two backward passes per DP-SGD step. The first one's hooks
compute each example's gradient norm from the layer's activations ``a`` and output gradients
``g``; the second backpropagates ``sum_b c_b loss_b``, with ``c_b = min(1, C / ||grad_b||)``, to
get the sum of the clipped gradients. That second pass propagates gradients through every layer
again, and it only needs, per layer, what the first pass's hooks already held. Book-keeping (Bu,
Wang, Zha and Karypis 2023, "Differentially Private Optimization on Large Model at Small Cost")
keeps ``a`` and ``g`` and forms the clipped sum directly: for a linear layer
``sum_b c_b sum_n g_bn a_bn^T`` is one matrix product, for an embedding one ``index_add``.

:class:`BookkeepingClipper` is Opacus's module with its norm samplers and hooks unchanged
(``fedrec.models.layers`` registers the faster norms of fedrec's layers); it only also keeps
each layer's ``(a, g)`` from the one backward pass. The DP optimizer
(``DPOptimizerFastGradientClipping``) then adds the noise and scales as before. The gradient is
Opacus's two-pass one up to float rounding (``tests/test_models_opacus.py`` compares both with
naive per-user clipping on every fedrec model, and the two with each other under dropout). Why not Opacus's own: it has no single-pass mode in 1.6, and one pass takes
0.80-0.92 of the two passes' time on fedrec's ID models, bringing a DP epoch from 2.03-2.06x a
plain one to 1.64-1.89x (``benchmarks/privacy_utility.py --slowdown-only``, README).

Supported layers, by exact type (a subclass may change what ``forward`` computes, and with it
the gradient; Opacus also picks its norm rule by exact type): ``nn.Linear``, ``nn.Embedding``
(without ``padding_idx``, ``sparse``, ``max_norm`` or ``scale_grad_by_freq``), ``nn.LayerNorm``
(with its bias), and ``fedrec.models.layers``' ``Linear`` and ``Embedding``: every layer with
parameters in fedrec's models. A model with any other is refused when the clipper is built, and
every step checks that each trainable parameter's layer ran and that no parameter became
trainable since (its raw gradient would otherwise be left unclipped). The one pass keeps every
layer's output gradient until the pass ends: memory of the order of the activations.
"""

from __future__ import annotations

import torch.nn.functional as F
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from torch import Tensor, nn

from fedrec.models import layers

LINEAR = (nn.Linear, layers.Linear)
EMBEDDING = (nn.Embedding, layers.Embedding)
SUPPORTED = (*LINEAR, *EMBEDDING, nn.LayerNorm)


class ClippingError(RuntimeError):
    """A step the one-pass clipper cannot vouch for (a layer that did not run, a parameter
    made trainable after the clipper was built): the step is not taken."""


class BookkeepingClipper(GradSampleModuleFastGradientClipping):
    """Opacus's ghost-norm module, plus the clipped gradient sum from its one backward pass."""

    def __init__(self, module: nn.Module, *, max_grad_norm: float) -> None:
        check_supported(module)
        super().__init__(
            module,
            batch_first=True,
            # the backward pass is of the *sum* of the per-example losses, so the output
            # gradients the hooks see are already per example (a mean's would be multiplied
            # back by the batch size, one more pass over every layer's output gradient)
            loss_reduction="sum",
            max_grad_norm=max_grad_norm,
            use_ghost_clipping=True,
        )
        self._kept: list[tuple[nn.Module, Tensor, Tensor]] = []

    def rearrange_grad_samples(self, *, module, backprops, loss_reduction, batch_first):  # type: ignore[no-untyped-def,override]
        """Opacus's per-layer (activations, backprops), also kept for :meth:`clipped_backward`
        (``backprops``: the output gradients of each example's own loss)."""
        activations, backprops = super().rearrange_grad_samples(
            module=module, backprops=backprops, loss_reduction=loss_reduction,
            batch_first=batch_first,
        )  # fmt: skip
        self._kept.append((module, activations[0], backprops))
        return activations, backprops

    def clipped_backward(self, per_example: Tensor) -> Tensor:
        """Set every trainable parameter's ``.grad`` to ``sum_b c_b grad_b`` (Float[B] losses
        ``per_example``); return the clipping factors ``c``. One backward pass."""
        trainable = {id(p) for p in self._module.parameters() if p.requires_grad}
        if trainable != {id(p) for p in self.trainable_parameters}:
            raise ClippingError(
                "the model's trainable parameters changed after the clipper was built; build "
                "a new one (a new parameter's raw gradient would escape clipping)"
            )
        if not self.hooks_enabled:
            raise ClippingError("the clipper's hooks are disabled: no per-example norms")
        self._kept.clear()
        try:
            per_example.sum().backward()  # the hooks compute the norms and keep (a, g)
            coef = self.get_clipping_coef()
            sums: dict[int, Tensor] = {}
            for module, a, g in self._kept:
                for param, grad in _clipped_sums(module, a, g, coef.to(g.dtype)).items():
                    sums[id(param)] = sums[id(param)] + grad if id(param) in sums else grad
        finally:
            self._kept.clear()
        missing = [tuple(p.shape) for p in self.trainable_parameters if id(p) not in sums]
        if missing or coef.shape != per_example.shape:
            raise ClippingError(
                f"parameters of shapes {missing} had no layer call in this step's backward "
                f"pass, or {coef.shape[0]} norms for {per_example.shape[0]} examples: their "
                "norms would be stale"
            )
        for p in self.trainable_parameters:
            p.grad = sums[id(p)].view_as(p)
        return coef


def check_supported(module: nn.Module) -> None:
    for name, sub in module.named_modules():
        if not any(p.requires_grad for p in sub.parameters(recurse=False)):
            continue
        if type(sub) not in SUPPORTED:
            raise NotImplementedError(
                f"{name or 'the model'} ({type(sub).__name__}): the one-pass clipper handles "
                "torch's and fedrec's Linear and Embedding and torch's LayerNorm only (exact "
                "types); use Opacus's ghost clipping for it"
            )
        if type(sub) in EMBEDDING and (
            sub.padding_idx is not None or sub.sparse or sub.max_norm is not None
            or sub.scale_grad_by_freq
        ):
            raise NotImplementedError(
                f"{name}: an Embedding with padding_idx, sparse, max_norm or scale_grad_by_freq "
                "is not supported"
            )
        if type(sub) is nn.LayerNorm and sub.weight is not None and sub.bias is None:
            raise NotImplementedError(f"{name}: a LayerNorm without bias is not supported")


def _clipped_sums(
    module: nn.Module, a: Tensor, g: Tensor, coef: Tensor
) -> dict[nn.Parameter, Tensor]:
    """{parameter: sum_b coef_b grad_b} of one layer call, from its input ``a`` and its
    per-example output gradient ``g`` (batch first)."""
    b = g.shape[0]
    scaled = g * coef.view(b, *([1] * (g.dim() - 1)))
    out: dict[nn.Parameter, Tensor] = {}
    kind = type(module)
    if kind in LINEAR:
        gs = scaled.reshape(-1, module.out_features)
        if module.weight.requires_grad:
            out[module.weight] = gs.t() @ a.to(gs.dtype).reshape(-1, module.in_features)
        if module.bias is not None and module.bias.requires_grad:
            out[module.bias] = gs.sum(0)
    elif kind in EMBEDDING:
        if module.weight.requires_grad:
            flat = scaled.reshape(-1, module.embedding_dim)
            out[module.weight] = flat.new_zeros(module.weight.shape).index_add_(
                0, a.reshape(-1), flat
            )
    elif kind is nn.LayerNorm:
        dims = tuple(range(scaled.dim() - len(module.normalized_shape)))
        if module.weight is not None and module.weight.requires_grad:
            normed = F.layer_norm(a.to(scaled.dtype), module.normalized_shape, eps=module.eps)
            out[module.weight] = (scaled * normed).sum(dims)
        if module.bias is not None and module.bias.requires_grad:
            out[module.bias] = scaled.sum(dims)
    else:  # check_supported refused it when the clipper was built
        raise NotImplementedError(type(module).__name__)
    return out
