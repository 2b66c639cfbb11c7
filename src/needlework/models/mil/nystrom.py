"""Nyström self-attention (Xiong et al., AAAI 2021), as used by TransMIL (METHODS.md §10.4).

``softmax(Q K̃ᵀ) · pinv(softmax(Q̃ K̃ᵀ)) · softmax(Q̃ Kᵀ) · V`` where the landmarks ``Q̃, K̃`` are the means
of ``m`` contiguous segments of the sequence (``m = min(num_landmarks, T)``; segments split the ``T``
tokens as evenly as possible, so no padding is needed) and ``pinv`` is the iterative Moore–Penrose
approximation. Optionally a depthwise convolution over the sequence of the values is added (the
"residual" of the reference implementation).

Example:
    >>> import torch
    >>> attn = NystromAttention(dim=32, heads=4, num_landmarks=8)
    >>> attn(torch.randn(2, 50, 32)).shape
    torch.Size([2, 50, 32])
"""

from __future__ import annotations

import torch
from torch import nn

from needlework.checks import check_shape


def iterative_pinv(x: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Approximate Moore–Penrose inverse of square matrices ``x`` ``(..., m, m)``.

    Iteration ``Z ← ¼ Z (13 I − XZ (15 I − XZ (7 I − XZ)))`` from ``Z₀ = Xᵀ / (‖X‖₁ ‖X‖_∞)``; the scale
    is computed per matrix so bags in a batch do not influence one another.
    """
    abs_x = x.abs()
    norm = abs_x.sum(dim=-1).amax(dim=-1) * abs_x.sum(dim=-2).amax(dim=-1)  # (...,)
    z = x.transpose(-1, -2) / norm[..., None, None]
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    for _ in range(iterations):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


def segment_means(x: torch.Tensor, m: int) -> torch.Tensor:
    """Means of ``m`` contiguous, nearly equal segments along dim −2: ``(..., T, d)`` → ``(..., m, d)``."""
    t = x.shape[-2]
    segment = torch.arange(t, device=x.device) * m // t  # non-decreasing, every id in [0, m) used
    sums = torch.zeros(*x.shape[:-2], m, x.shape[-1], dtype=x.dtype, device=x.device)
    sums = sums.index_add(-2, segment, x)
    counts = torch.bincount(segment, minlength=m).to(x.dtype)
    return sums / counts[:, None]


class NystromAttention(nn.Module):
    """Multi-head Nyström self-attention on ``x`` ``(B, T, dim)`` → ``(B, T, dim)``.

    Args:
        dim: token width.
        heads: number of heads; ``dim_head`` defaults to ``dim // heads``.
        num_landmarks: landmarks ``m`` (capped at the sequence length).
        pinv_iterations: iterations of :func:`iterative_pinv`.
        residual: add a depthwise convolution over the sequence of the values (kernel ``residual_kernel``).
        dropout: dropout on the output projection.
        out_projection: end with ``Linear(heads·dim_head → dim)``; False (needs ``heads·dim_head == dim``)
            returns the concatenated heads, as torchmil's layer does.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        dim_head: int | None = None,
        num_landmarks: int = 256,
        pinv_iterations: int = 6,
        residual: bool = True,
        residual_kernel: int = 33,
        dropout: float = 0.0,
        out_projection: bool = True,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head or dim // heads
        self.num_landmarks, self.pinv_iterations = num_landmarks, pinv_iterations
        inner = heads * self.dim_head
        if not out_projection and inner != dim:
            raise ValueError(f"out_projection=False needs heads * dim_head == dim, got {inner} != {dim}")
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        projection = nn.Linear(inner, dim) if out_projection else nn.Identity()
        self.to_out = nn.Sequential(projection, nn.Dropout(dropout))
        self.value_conv = (
            nn.Conv2d(
                heads,
                heads,
                (residual_kernel, 1),
                padding=(residual_kernel // 2, 0),
                groups=heads,
                bias=False,
            )
            if residual
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, T, dim)`` → ``(B, T, dim)``."""
        return self.attend(x)[0]

    def attend(self, x: torch.Tensor, row: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Output ``(B, T, dim)`` and, if ``row`` is given, token ``row``'s attention over all tokens
        ``(B, T)`` (head-averaged row of ``softmax(QK̃ᵀ) pinv(·) softmax(Q̃Kᵀ)``; approximate, may be
        slightly negative)."""
        b, t, _ = check_shape(x, ["B", "T", "dim"], "x").values()
        q, k, v = self.to_qkv(x).view(b, t, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        q = q * self.dim_head**-0.5  # (B, h, T, d)
        m = min(self.num_landmarks, t)
        q_land, k_land = segment_means(q, m), segment_means(k, m)
        attn1 = (q @ k_land.transpose(-1, -2)).softmax(dim=-1)  # (B, h, T, m)
        attn2_inv = iterative_pinv((q_land @ k_land.transpose(-1, -2)).softmax(dim=-1), self.pinv_iterations)
        attn3 = (q_land @ k.transpose(-1, -2)).softmax(dim=-1)  # (B, h, m, T)
        # right to left: (T×m)(m×m)(m×T)(T×d) costs O(T·m·d + m²·d) instead of the O(T·m²) of forming
        # attn1 @ attn2_inv first (the same product; ~2× fewer FLOPs at m = 256, d = 64)
        out = attn1 @ (attn2_inv @ (attn3 @ v))
        if self.value_conv is not None:
            out = out + self.value_conv(v)
        out = self.to_out(out.transpose(1, 2).reshape(b, t, self.heads * self.dim_head))
        if row is None:
            return out, None
        weights = (attn1[:, :, row : row + 1] @ attn2_inv) @ attn3  # (B, h, 1, T)
        return out, weights.squeeze(2).mean(dim=1)
