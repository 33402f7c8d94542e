"""The C++ attention kernel of the fused Transformer block (softmax(scale q k^T) v per sample
and head, causal top-left as torch's is_causal): against torch's scaled_dot_product_attention
in float64 on fresh random data, for odd shapes, strided views, both masks, several threads,
extreme scores, and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsecore import has_cpu_ext
from sparsecore.nn.fused import causal_attention
from sparsecore.testing import kernel_threads

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not has_cpu_ext(), reason="C++ extension not built")]

attention = torch.ops.sparsecore._attention_cpu if has_cpu_ext() else None


def _ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
         scale: float | None = None) -> torch.Tensor:
    """torch's SDPA in float64 on (B, T, H, D) operands -> (B, Tq, H, D)."""
    q, k, v = (z.double().transpose(1, 2) for z in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale).transpose(1, 2)


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    tol = 1e-5 if got.dtype == torch.float32 else 1e-12
    scale = float(ref.abs().max()) + 1e-30
    err = float((got.double() - ref).abs().max())
    assert got.shape == ref.shape and err <= tol * scale, f"error {err:.3g} of {scale:.3g}"


SHAPES = [  # B, Tq, Tk, H, D
    (2, 128, 128, 8, 64),  # the bench's Transformer, one block
    (3, 37, 37, 3, 20),  # rows not a multiple of the row block, D not of the vector
    (1, 1, 1, 2, 16),
    (2, 5, 9, 2, 7),  # more keys than queries
    (2, 70, 40, 2, 24),  # more queries than keys: the last rows see every key
    (1, 33, 33, 1, 97),  # D over the output accumulators' width
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_sdpa(dtype, causal, shape) -> None:
    b, tq, tk, h, d = shape
    q = torch.randn(b, tq, h, d, dtype=dtype) * 2
    k = torch.randn(b, tk, h, d, dtype=dtype) * 2
    v = torch.randn(b, tk, h, d, dtype=dtype)
    got = attention(q, k, v, causal)
    assert got.is_contiguous()
    _close(got, _ref(q, k, v, causal))
    _close(attention(q, k, v, causal, 0.3), _ref(q, k, v, causal, scale=0.3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_strided_views_and_threads(dtype) -> None:
    """q, k, v as the fused block passes them (views into one stacked (B, T, 3d) tensor),
    and a k whose last dim is strided (copied first); on three threads."""
    b, t, h, d = 3, 45, 4, 12
    qkv = torch.randn(b, t, 3 * h * d, dtype=dtype)
    q, k, v = (z.view(b, t, h, d) for z in qkv.split(h * d, dim=-1))
    with kernel_threads(3):
        got = attention(q, k, v, True)
        k2 = torch.randn(b, t, h, 2 * d, dtype=dtype)[..., ::2]
        got2 = attention(q, k2, v, True)
    _close(got, _ref(q, k, v, True))
    _close(got2, _ref(q, k2, v, True))
    # the block's helper: (B, T, 3d) -> (B, T, d), heads side by side
    _close(causal_attention(qkv, h), _ref(q, k, v, True).reshape(b, t, h * d))


def test_extreme_scores() -> None:
    """Scores of +-1e4 (softmax saturates to one key), equal scores (uniform), and inputs
    whose products are denormal: the max is subtracted first and nothing turns NaN."""
    b, t, h, d = 1, 40, 2, 16
    q = torch.randn(b, t, h, d) * 30
    k = torch.randn(b, t, h, d) * 30
    v = torch.randn(b, t, h, d)
    for qq in (q, torch.zeros_like(q), torch.full_like(q, 1e-20)):
        got = attention(qq, k, v, True)
        assert torch.isfinite(got).all()
        ref = _ref(qq, k, v, True)
        # scores in the thousands carry float32 rounding of ~1e-4 into the softmax: held to
        # torch's own float32 attention on the same input
        torch32 = F.scaled_dot_product_attention(
            qq.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        ).transpose(1, 2)
        err, err_torch = ((z.double() - ref).abs().max().item() for z in (got, torch32))
        assert err <= max(4 * err_torch, 1e-5 * ref.abs().max().item()), (err, err_torch)


def test_gradient_mode_falls_back_to_torch() -> None:
    """The kernel has no backward: with a tensor that needs a gradient the helper runs
    torch's attention, and the gradient flows."""
    qkv = torch.randn(2, 10, 24, requires_grad=True)
    y = causal_attention(qkv, 2)
    y.sum().backward()
    assert qkv.grad is not None and torch.isfinite(qkv.grad).all()


def test_errors() -> None:
    q = torch.randn(2, 5, 3, 8)
    with pytest.raises(RuntimeError, match=r"\(B, T, heads, head_dim\)"):
        attention(q[0], q, q, True)
    with pytest.raises(RuntimeError, match="float32 or all float64"):
        attention(q, q.double(), q, True)
    with pytest.raises(RuntimeError, match="float32 or all float64"):
        attention(q.half(), q.half(), q.half(), True)
    with pytest.raises(RuntimeError, match="differ in shape"):
        attention(q, q, q[:, :4], True)
    with pytest.raises(RuntimeError, match="batch, heads or head_dim"):
        attention(q, torch.randn(2, 5, 3, 9), torch.randn(2, 5, 3, 9), True)
    with pytest.raises(RuntimeError, match="no keys"):
        attention(q, q[:, :0], q[:, :0], False)
    assert attention(q[:, :0], q, q, True).shape == (2, 0, 3, 8)
