"""Optional ``spconv`` backend for :class:`needlework.ops.sparse_conv.SubmanifoldConv2d`.

Install with ``pip install "needlework[spconv]"`` (CPU) or an ``spconv-cuXXX`` wheel (CUDA). Two measured
facts of spconv 2.3.8 on CPU (ENVIRONMENT.md §5.1) are handled here:

* its backward asks for the current CUDA stream and fails without CUDA: the module-level
  ``get_current_stream`` of ``spconv.pytorch.ops`` and ``spconv.pytorch.cppcore`` is replaced by one that
  returns 0, only when CUDA is unavailable;
* with more than one thread its CPU kernels race and return wrong values: on CPU the forward **and** the
  backward run under ``torch.set_num_threads(1)`` (the call is wrapped in an autograd function whose
  backward re-enters the one-thread guard).

The default gather + matmul backend is the reference; ``tests/test_mil_sparse_conv.py`` checks this
backend against it when spconv is installed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

_patched = False


def import_spconv() -> Any:
    """``spconv.pytorch``, patched for CPU backward; an ImportError naming the extra if missing."""
    global _patched
    try:
        import spconv.pytorch as spconv
        import spconv.pytorch.cppcore as cppcore
        import spconv.pytorch.ops as ops
    except ImportError as err:
        raise ImportError(
            "backend='spconv' needs spconv: pip install 'needlework[spconv]' (CPU) or the spconv-cuXXX "
            "wheel matching your CUDA; or use the default backend='torch'"
        ) from err
    if not _patched and not torch.cuda.is_available():

        def no_stream() -> int:  # CPU has no stream; spconv's backward asks for one regardless
            return 0

        ops.get_current_stream = no_stream
        cppcore.get_current_stream = no_stream
        _patched = True
    return spconv


@contextlib.contextmanager
def one_thread(enabled: bool = True) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(1)`` (restored afterwards)."""
    before = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _GuardedCall(torch.autograd.Function):
    """Run ``fn(*tensors)`` with grad enabled under the one-thread guard, and its backward likewise."""

    @staticmethod
    def forward(ctx: Any, fn: Any, guard: bool, *tensors: torch.Tensor) -> torch.Tensor:
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
        with one_thread(guard), torch.enable_grad():
            out = fn(*inputs)
        ctx.guard, ctx.inputs, ctx.out = guard, inputs, out
        return out.detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        wanted = [t for t in ctx.inputs if t.requires_grad]
        with one_thread(ctx.guard):
            grads = iter(torch.autograd.grad(ctx.out, wanted, grad, allow_unused=True))
        return (None, None, *(next(grads) if t.requires_grad else None for t in ctx.inputs))


def spconv_submanifold_conv2d(
    features: torch.Tensor,
    sites: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    batch_size: int,
    dilation: int = 1,
) -> torch.Tensor:
    """Submanifold convolution through ``spconv.SubMConv2d`` with needlework's weight layout.

    Args: as :func:`needlework.ops.sparse_conv.submanifold_conv2d`, with ``sites`` ``(S, 3)`` ``(b, y, x)``
    and ``batch_size`` instead of a neighbour table.
    """
    spconv = import_spconv()
    c_out, c_in, k, _ = weight.shape
    spatial = [int(sites[:, 1].max()) + 1, int(sites[:, 2].max()) + 1]
    layer = spconv.SubMConv2d(c_in, c_out, k, dilation=dilation, padding=(k // 2) * dilation, bias=False)
    layer = layer.to(features.device)
    indices = sites.to(device=features.device, dtype=torch.int32).contiguous()

    def run(f: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x = spconv.SparseConvTensor(f, indices, spatial, batch_size)
        # spconv stores (C_out, kh, kw, C_in); ours is nn.Conv2d's (C_out, C_in, kh, kw)
        out = torch.func.functional_call(layer, {"weight": w.permute(0, 2, 3, 1).contiguous()}, (x,))
        return out.features

    out = _GuardedCall.apply(run, features.device.type == "cpu", features, weight)
    return out if bias is None else out + bias
