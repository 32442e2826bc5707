"""Book-Keeping (BK) per-example clipping: DP-SGD at about the cost of one non-private step.

Bu, Wang, Zha & Karypis, "Differentially Private Optimization on Large Model at Small
Cost", ICML 2023, Algorithm 1. One forward pass records, for every layer with trainable
parameters, its input activations ``a``; one backward pass computes only the gradients
``g`` of ``sum_i loss_i`` with respect to those layers' *outputs* (never the unclipped
weight gradients). Everything else is arithmetic on the book-kept ``(a, g)``:

1. Per-example gradient norms. A Linear layer applied to ``T`` positions per example
   (``[B, T, d_in]`` inputs, a conv's ``T = H_out W_out`` patches, or the ``T`` uses of
   a layer applied several times per example) has the per-example weight gradient
   ``G_i = sum_t g_it a_it^T``, whose squared norm is, without materialising ``G_i``,
   the *ghost norm* (Li, Tramer, Liang & Hashimoto, "Large Language Models Can Be Strong
   Differentially Private Learners", ICLR 2022, §4)::

       ||G_i||_F^2 = sum_{t,s} (a_it . a_is)(g_it . g_is)       (= |a_i|^2 |g_i|^2 if T = 1)

   Each layer takes ghost norm iff ``2 T^2 < d_in d_out`` -- the two ``T x T`` Gram
   matrices are smaller than ``G_i`` -- and materialises ``G_i`` otherwise (the layer-wise
   "mixed ghost norm" of Bu, Mao & Xu, "Scalable and Efficient Training of Large
   Convolutional Neural Networks with Differential Privacy", NeurIPS 2022, used by BK).
   Bias: ``|sum_t g_it|^2``. GroupNorm / LayerNorm affine parameters are small: their
   per-example gradients are materialised.
2. Clip factors ``c_i = min(1, C / (|grad_i| + 1e-6))`` (Abadi et al. 2016, Algorithm 1;
   the formula of Opacus' clipping, so the modes agree).
3. The clipped *sum* directly, at the cost of an ordinary weight gradient:
   ``sum_i c_i G_i = sum_{i,t} (c_i g_it) a_it^T`` -- one matmul for a Linear layer, the
   convolution's own weight gradient with output gradient ``c_i g_i`` for a Conv2d, and
   ``sum_i c_i G_i`` over the already materialised ``G_i`` where the rule chose those.

Noise and the 1/(qN) scaling are left to the caller (privacy/dp_sgd.py).

Supported: ``nn.Linear``, ``nn.Conv2d`` (``groups=1``, zero padding), ``nn.GroupNorm``,
``nn.LayerNorm``, batch first. A layer may run several times per forward pass, each time on
the whole batch ``[B, ...]`` in order: its uses are concatenated along ``T``, so the cross terms
between uses enter the norm (the per-example gradient is the *sum* of the uses'
contributions). Any other module owning trainable parameters is refused up front.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .errors import PrivacyConfigError

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)


@dataclass
class _Record:
    """The book-kept tensors of one layer: inputs and outputs of each use in this pass."""

    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def check_bk_supported(module: nn.Module) -> None:
    """Raise :class:`PrivacyConfigError` for a layer BK has no rule for (exact types only: a
    subclass may compute something else) and for parameters shared between layers (their
    per-example gradient would be the sum over the layers, which the per-layer norms miss)."""
    owner: dict[int, str] = {}
    for name, m in module.named_modules():
        if not _trainable(m):
            continue
        where = f"{type(m).__name__} ({name or 'the root module'})"
        if type(m) not in SUPPORTED_LAYERS:
            raise PrivacyConfigError(
                f"grad_sample_mode 'bk' has no per-example gradient rule for {where}, which owns "
                f"trainable parameters; supported: {', '.join(t.__name__ for t in SUPPORTED_LAYERS)}. "
                "Use grad_sample_mode 'hooks' or 'ghost' for this model.")
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros"):
            raise PrivacyConfigError(
                f"grad_sample_mode 'bk' supports Conv2d with groups=1 and zero padding only; {where} has "
                f"groups={m.groups}, padding_mode={m.padding_mode!r}. Use grad_sample_mode 'hooks'.")
        for p in _trainable(m):
            if id(p) in owner:
                raise PrivacyConfigError(
                    f"grad_sample_mode 'bk' does not support parameters shared between layers: {where} "
                    f"and {owner[id(p)]}. Use grad_sample_mode 'hooks'.")
            owner[id(p)] = where


class BookKeeping:
    """Forward hooks that book-keep layer inputs and outputs, and the BK clipped sum.

    Usage: run the forward pass of the per-example losses, then
    :meth:`clip_and_accumulate` (which accumulates ``sum_i c_i grad_i`` into ``p.grad``).
    """

    def __init__(self, module: nn.Module) -> None:
        check_bk_supported(module)
        self.module = module
        self.hooks_enabled = True
        self.per_sample_norms: Tensor | None = None  # |grad_i| of the last batch, for inspection
        #: layer -> its trainable parameters by name
        self.layers = {m: {n: p for n, p in m.named_parameters(recurse=False) if p.requires_grad}
                       for m in module.modules() if _trainable(m)}
        self.records = {m: _Record() for m in self.layers}
        self._handles: list[RemovableHandle] = [m.register_forward_hook(self._record) for m in self.layers]

    # -- the interface PrivateStepOptimizer expects of its hooks object (as of Opacus') --
    def disable_hooks(self) -> None:
        self.hooks_enabled = False

    def enable_hooks(self) -> None:
        self.hooks_enabled = True

    def _close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def clear(self) -> None:
        """Drop the book-kept tensors (and the graph they hold)."""
        self.records = {m: _Record() for m in self.layers}

    def _record(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if not self.hooks_enabled or not torch.is_grad_enabled() or not output.requires_grad:
            return
        rec = self.records[module]
        rec.inputs.append(inputs[0].detach())
        rec.outputs.append(output)
        rec.versions.append(output._version)

    # -- BK ----------------------------------------------------------------------------
    @torch.no_grad()
    def clip_and_accumulate(self, losses: Tensor, max_grad_norm: float) -> Tensor:
        """Accumulate ``sum_i c_i grad_i`` of the per-example ``losses`` (shape ``[B]``)
        into ``p.grad``, ``c_i = min(1, C / (|grad_i| + 1e-6))``; returns ``|grad_i|``."""
        batch = losses.shape[0]
        records, used = self.records, [m for m, rec in self.records.items() if rec.outputs]
        self.clear()
        for m in used:
            rec = records[m]
            if any(out.shape[0] != batch for out in rec.outputs):
                raise RuntimeError(f"bk: {type(m).__name__} ran on batches of {[o.shape[0] for o in rec.outputs]} "
                                   f"rows, not on the whole batch of {batch}: each use must see every example")
            if any(out._version != v for out, v in zip(rec.outputs, rec.versions)):
                raise RuntimeError(f"bk: the output of {type(m).__name__} was modified in place after the "
                                   "forward pass; use grad_sample_mode 'hooks'")
        outputs = [out for m in used for out in records[m].outputs]
        # Bu et al. 2023, Alg. 1: one backward pass, for the layers' output gradients only
        with torch.enable_grad():
            grads = list(torch.autograd.grad(losses.sum(), outputs, allow_unused=True)) if outputs else []
        layer_grads: dict[nn.Module, _LayerGrad] = {}
        for m in used:
            n_uses = len(records[m].outputs)
            g = [torch.zeros_like(o) if gy is None else gy for o, gy in zip(records[m].outputs, grads[:n_uses])]
            del grads[:n_uses]
            layer_grads[m] = _layer_grad(m, self.layers[m], records[m].inputs, g)
        del records, outputs

        norms_sq = [lg.norm_sq() for lg in layer_grads.values()]
        norms = (torch.stack(norms_sq).sum(0) if norms_sq else losses.new_zeros(batch)).sqrt()
        clip = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # as Opacus: optimizer.py, ghost clipping
        for m, params in self.layers.items():
            clipped = layer_grads[m].clipped_sum(clip) if m in layer_grads else {}
            for name, p in params.items():
                g = clipped[name].view_as(p) if name in clipped else torch.zeros_like(p)
                p.grad = g if p.grad is None else p.grad + g
        self.per_sample_norms = norms
        return norms


class _LayerGrad:
    """Book-kept gradient information of one layer for one batch."""

    def norm_sq(self) -> Tensor:
        """``[B]``: squared norm of example i's gradient over this layer's trainable parameters."""
        raise NotImplementedError

    def clipped_sum(self, clip: Tensor) -> dict[str, Tensor]:
        """Parameter name -> ``sum_i clip_i grad_i``."""
        raise NotImplementedError


class _AffineGrad(_LayerGrad):
    """A Linear map over ``T`` positions per example: ``a [B, T, d_in]``, ``g [B, T, d_out]``
    (a Linear layer, or a Conv2d over its unfolded patches; views, not copies). A subclass
    that has the Gram matrix ``a a^T [B, T, T]`` by a cheaper route passes ``a_gram`` (and
    ``a=None``) for the ghost norm."""

    def __init__(self, a: Tensor | None, g: Tensor, weight: bool, bias: bool, *, a_gram: Tensor | None = None) -> None:
        t = g.shape[1]
        self.weight, self.bias, self.a_gram = weight, bias, a_gram
        if t == 1:  # plain [B, d]
            a, g = (None if a is None else a[:, 0]), g[:, 0]
        self.a, self.g = a, g
        self.per_example: Tensor | None = None
        if a is not None and weight and t > 1 and ghost_is_dearer(t, a.shape[2], g.shape[2]):
            self.per_example = torch.bmm(g.transpose(1, 2), a)  # [B, d_out, d_in]: materialise G_i

    def norm_sq(self) -> Tensor:
        a, g = self.a, self.g
        if g.dim() == 2:  # T = 1: |G_i|^2 = |g_i|^2 |a_i|^2 and |bias_i|^2 = |g_i|^2
            g_sq = torch.linalg.vecdot(g, g)
            if not self.weight:
                return g_sq
            return g_sq * (torch.linalg.vecdot(a, a) + 1.0) if self.bias else g_sq * torch.linalg.vecdot(a, a)
        out = []
        if self.per_example is not None:
            out.append(self.per_example.flatten(1).pow(2).sum(1))
        elif self.weight:  # ghost norm, Li et al. 2022 §4: sum_{t,s} (a_t . a_s)(g_t . g_s)
            a_gram = self.a_gram if self.a_gram is not None else torch.bmm(a, a.transpose(1, 2))
            out.append((a_gram * torch.bmm(g, g.transpose(1, 2))).sum((1, 2)))
        if self.bias:
            g_sum = g.sum(1)
            out.append(torch.linalg.vecdot(g_sum, g_sum))
        return out[0] if len(out) == 1 else out[0] + out[1]

    def clipped_sum(self, clip: Tensor) -> dict[str, Tensor]:
        out = {}
        if self.per_example is not None:
            out["weight"] = torch.einsum("b,boi->oi", clip, self.per_example)
        elif self.weight:  # sum_{i,t} (c_i g_it) a_it^T: one matmul, the cost of the ordinary weight gradient
            out["weight"] = self._clipped_weight(clip)
        if self.bias:
            out["bias"] = clip @ (self.g if self.g.dim() == 2 else self.g.sum(1))
        return out

    def _clipped_weight(self, clip: Tensor) -> Tensor:
        if self.g.dim() == 2:
            return (self.g * clip[:, None]).t() @ self.a
        return (self.g * clip[:, None, None]).flatten(0, 1).t() @ self.a.flatten(0, 1)


def ghost_is_dearer(t: int, d_in: int, d_out: int) -> bool:
    """The mixed ghost-norm rule (Bu et al. 2023, §3.2): the ghost norm costs ~2 T^2 per
    example, the materialised gradient d_in d_out; take the cheaper."""
    return 2 * t * t >= d_in * d_out


class _ConvGrad(_AffineGrad):
    """A Conv2d. Its clipped weight sum is the convolution's own weight gradient with
    ``c_i g_i`` as output gradient, and for the ghost norm the patch Gram matrix comes from
    the pixel Gram matrix (:func:`_patch_gram`): neither unfolds the input. Only a layer
    whose gradient is materialised (few channels, many positions) is unfolded (im2col)."""

    def __init__(self, conv: nn.Conv2d, inputs: list[Tensor], grads: list[Tensor], weight: bool,
                 bias: bool) -> None:
        self.conv, self.uses = conv, list(zip(inputs, grads))
        g = _cat_uses([y.flatten(2).transpose(1, 2) for y in grads])  # [B, T, C_out]
        t, d_in = g.shape[1], conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        same_size = len({x.shape for x in inputs}) == 1
        if weight and t > 1 and same_size and not ghost_is_dearer(t, d_in, g.shape[2]):
            super().__init__(None, g, weight, bias, a_gram=_patch_gram(conv, inputs))
        else:
            a = _cat_uses([_unfold(conv, x) for x in inputs]) if weight else None  # [B, T, C kh kw]
            super().__init__(a, g, weight, bias)

    def _clipped_weight(self, clip: Tensor) -> Tensor:
        conv, total = self.conv, None
        for x, gy in self.uses:
            padding = conv.padding
            if isinstance(padding, str):  # "same" / "valid": pad explicitly, as for the norms
                x, padding = _padded(conv, x), (0, 0)
            _, w, _ = torch.ops.aten.convolution_backward(
                gy * clip[:, None, None, None], x, conv.weight, None, conv.stride, padding, conv.dilation,
                False, [0, 0], 1, [False, True, False])
            total = w if total is None else total + w
        return total


def _cat_uses(per_use: list[Tensor]) -> Tensor:
    """A layer's uses in one pass, concatenated along T (so the cross terms count)."""
    return per_use[0] if len(per_use) == 1 else torch.cat(per_use, dim=1)


class _MaterialisedGrad(_LayerGrad):
    """Per-example gradients small enough to keep: ``name -> [B, *param.shape]``."""

    def __init__(self, per_example: dict[str, Tensor]) -> None:
        self.per_example = per_example

    def norm_sq(self) -> Tensor:
        return sum(g.flatten(1).pow(2).sum(1) for g in self.per_example.values())

    def clipped_sum(self, clip: Tensor) -> dict[str, Tensor]:
        return {name: torch.einsum("b,b...->...", clip, g) for name, g in self.per_example.items()}


def _padded(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """The input as the convolution sees it, zero padding included."""
    if isinstance(conv.padding, str):  # "same" / "valid": pad as nn.Conv2d does
        return F.pad(x, conv._reversed_padding_repeated_twice)
    ph, pw = conv.padding
    return F.pad(x, (pw, pw, ph, ph)) if ph or pw else x


def _unfold(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """Conv2d input ``[B, C, H, W]`` -> patches ``[B, H_out W_out, C kh kw]`` (the conv is
    a Linear map over them, with the weight viewed as ``[C_out, C kh kw]``)."""
    cols = F.unfold(_padded(conv, x), conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    return cols.transpose(1, 2)


def _patch_gram(conv: nn.Conv2d, inputs: list[Tensor]) -> Tensor:
    """``[B, T, T]``: Gram matrix of the conv's input patches over all uses (T = uses x output
    positions, in :func:`_cat_uses` order), without unfolding. A patch is the padded input at
    the kernel offsets k from its corner, so ``<patch_t, patch_s> = sum_k <x[t + k], x[s + k]>``:
    one pixel Gram matrix ``[B, P, P]`` (P = uses x padded pixels, inner dimension C), summed
    over the ``kh kw`` offsets by strided slices of it -- C inner products per pixel pair
    instead of the ``C kh kw`` of im2col, and no ``kh kw``-fold copy of the input."""
    xs = [_padded(conv, x) for x in inputs]
    b, c, hp, wp = xs[0].shape
    uses = len(xs)
    pixels = torch.cat([x.flatten(2) for x in xs], dim=2)  # [B, C, U Hp Wp]
    gram = torch.bmm(pixels.transpose(1, 2), pixels).view(b, uses, hp, wp, uses, hp, wp)
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    # Shifting both pixels of a pair by a kernel offset is a diagonal step in (col, col') and
    # (row, row'): sum over the column offsets first, then over the row offsets (separable:
    # kw + kh strided additions instead of kw kh).
    per_col = None
    for j in range(kw):
        cols = slice(j * dw, j * dw + sw * (wo - 1) + 1, sw)
        part = gram[:, :, :, cols, :, :, cols]  # [B, U, Hp, Wo, U, Hp, Wo]
        per_col = part if per_col is None else per_col + part
    out = None
    for i in range(kh):
        rows = slice(i * dh, i * dh + sh * (ho - 1) + 1, sh)
        part = per_col[:, :, rows, :, :, rows, :]  # [B, U, Ho, Wo, U, Ho, Wo]
        out = part if out is None else out + part
    t = uses * ho * wo
    return out.reshape(b, t, t)


def _layer_grad(module: nn.Module, params: dict[str, nn.Parameter], inputs: list[Tensor],
                grads: list[Tensor]) -> _LayerGrad:
    """The book-kept (a, g) of every use of ``module`` -> its per-example gradient information."""
    batch = grads[0].shape[0]
    weight, bias = "weight" in params, "bias" in params
    if isinstance(module, nn.Linear):
        a = _cat_uses([x.reshape(batch, -1, x.shape[-1]) for x in inputs])
        g = _cat_uses([y.reshape(batch, -1, y.shape[-1]) for y in grads])
        return _AffineGrad(a, g, weight, bias)
    if isinstance(module, nn.Conv2d):
        return _ConvGrad(module, inputs, grads, weight, bias)
    per_example: dict[str, Tensor] = {}
    for x, gy in zip(inputs, grads):
        if isinstance(module, nn.GroupNorm):
            x_hat = F.group_norm(x, module.num_groups, eps=module.eps)
            reduce = lambda t: t.flatten(2).sum(2)  # noqa: E731 -- [B, C, *] -> [B, C]
        else:
            x_hat = F.layer_norm(x, module.normalized_shape, eps=module.eps)
            shape = module.normalized_shape
            reduce = lambda t, shape=shape: t.reshape(batch, -1, *shape).sum(1)  # noqa: E731
        use = {"weight": reduce(gy * x_hat), "bias": reduce(gy)}  # the layer's own gradient formula
        for name in params:
            per_example[name] = use[name] if name not in per_example else per_example[name] + use[name]
    return _MaterialisedGrad(per_example)
