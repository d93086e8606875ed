"""Row-blocked relation cross-entropy: never holds more than one (G, block, R) slab of logits.

Forward walks row blocks and returns the per-group mean CE, each row in the form without cancellation

    CE_i = Σ_j p_t_ij (m_i - s_ij) + log Σ_j exp(s_ij - m_i),    m_i = max_j s_ij    (both terms >= 0)

(``lse_i - Σ_j p_t_ij s_ij`` subtracts two numbers near the largest logit: with logits ~180 and a loss ~1e-4 it
loses three digits in fp32). It keeps per row the maxima and the log-sums of the shifted exponentials of the
student and teacher logits, so softmax = exp((s - m) - log l) comes back without rounding lse = m + log l to the
logits' magnitude. Backward recomputes each slab from the saved inputs and statistics:

    dS_blk = (softmax(s_blk) - softmax(t_blk)) * student_scale * grad_g / R
    dX[blk] += dS_blk @ X          dX += dS_blkᵀ @ X[blk]

Extra memory: O(G·block·R) for the slab temporaries + O(G·R) statistics, instead of O(G·R²).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

# Elements (fp32) of one (G, block, R) slab. Two to three slab-sized temporaries are live at once, so the CPU
# default bounds the transient memory to about 3 * 4 B * 2**22 = 48 MiB whatever G and R are. On CUDA (the
# fallback when triton is missing) small slabs would make the loop launch-bound, so the budget is larger.
DEFAULT_BLOCK_ELEMS = 1 << 22
DEFAULT_BLOCK_ELEMS_CUDA = 1 << 26


def block_rows_for(groups: int, rows: int, block_elems: int = DEFAULT_BLOCK_ELEMS) -> int:
    """Rows per block so that a (groups, block, rows) slab holds at most ``block_elems`` elements (>= 1 row)."""
    return max(1, min(rows, block_elems // max(1, groups * rows)))


def _slab(x: torch.Tensor, lo: int, hi: int, scale: float) -> torch.Tensor:
    """scale * x[:, lo:hi] @ xᵀ as (G, hi - lo, R)."""
    return torch.bmm(x[:, lo:hi], x.transpose(1, 2)).mul_(scale)


class _ChunkedRelationCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, student_scale, teacher_scale, block):
        with torch.autocast(student.device.type, enabled=False):  # logits stay fp32 under autocast
            return _ChunkedRelationCE._forward(ctx, student, teacher, student_scale, teacher_scale, block)

    @staticmethod
    def _forward(ctx, student, teacher, student_scale, teacher_scale, block):
        s = student.detach().float()
        t = teacher.detach().float()
        groups, rows, _ = s.shape
        # per row: max and log Σ exp(x - max) of the student (m_s, ll_s) and teacher (m_t, ll_t) logits
        m_s, ll_s, m_t, ll_t = (s.new_empty(groups, rows) for _ in range(4))
        ce_sum = s.new_zeros(groups)
        for lo in range(0, rows, block):
            hi = min(rows, lo + block)
            gap = _slab(s, lo, hi, student_scale)
            mx_s = gap.amax(-1, keepdim=True)
            gap.neg_().add_(mx_s)  # m_i - s_ij >= 0, in place
            ll_s[:, lo:hi] = gap.neg().exp_().sum(-1).log_()
            t_blk = _slab(t, lo, hi, teacher_scale)
            mx_t = t_blk.amax(-1, keepdim=True)
            e_t = t_blk.sub_(mx_t).exp_()  # unnormalised teacher softmax, in place
            l_t = e_t.sum(-1)
            m_s[:, lo:hi], m_t[:, lo:hi], ll_t[:, lo:hi] = mx_s.squeeze(-1), mx_t.squeeze(-1), l_t.log()
            # CE_i = Σ_j p_t_ij (m_i - s_ij) + log Σ_j exp(s_ij - m_i), p_t = e_t / l_t
            ce_sum += (e_t.mul_(gap).sum(-1) / l_t + ll_s[:, lo:hi]).sum(-1)
            del gap, t_blk, e_t
        ctx.save_for_backward(student, teacher, m_s, ll_s, m_t, ll_t)
        ctx.scales = (student_scale, teacher_scale)
        ctx.block = block
        return ce_sum / rows

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_groups):
        with torch.autocast(grad_groups.device.type, enabled=False):
            return _ChunkedRelationCE._backward(ctx, grad_groups)

    @staticmethod
    def _backward(ctx, grad_groups):
        student, teacher, m_s, ll_s, m_t, ll_t = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        student_scale, teacher_scale = ctx.scales
        s = student.detach().float()
        t = teacher.detach().float()
        rows = s.shape[1]
        coef = (grad_groups.float() * (student_scale / rows))[:, None, None]
        dx = torch.zeros_like(s)
        for lo in range(0, rows, ctx.block):
            hi = min(rows, lo + ctx.block)
            # exp((x - m) - log l): the shift first, so the exponent keeps the precision of x - m
            ds = _slab(s, lo, hi, student_scale).sub_(m_s[:, lo:hi, None]).sub_(ll_s[:, lo:hi, None]).exp_()
            p_t = _slab(t, lo, hi, teacher_scale).sub_(m_t[:, lo:hi, None]).sub_(ll_t[:, lo:hi, None]).exp_()
            ds.sub_(p_t).mul_(coef)
            del p_t
            dx[:, lo:hi] += torch.bmm(ds, s)  # (G, block, D) temporary; baddbmm_ into this view loops per group
            dx.baddbmm_(ds.transpose(1, 2), s[:, lo:hi])  # in place: no (G, R, D) temporary
            del ds
        return dx.to(student.dtype), None, None, None, None


def relation_ce_rows_chunked(student: torch.Tensor, teacher: torch.Tensor, student_scale: float,
                             teacher_scale: float, block_rows: int | None = None,
                             block_elems: int | None = None) -> torch.Tensor:
    """Per-group mean over rows of the relation CE, (G,) fp32.

    Rows per block: ``block_rows`` if given, else the most rows whose (G, block, R) slab fits ``block_elems``
    (default: the module-level ``DEFAULT_BLOCK_ELEMS[_CUDA]``, read at call time so it can be tuned globally).
    """
    groups, rows, _ = student.shape
    if block_rows is None:
        default = DEFAULT_BLOCK_ELEMS_CUDA if student.is_cuda else DEFAULT_BLOCK_ELEMS
        block_rows = block_rows_for(groups, rows, block_elems or default)
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    return _ChunkedRelationCE.apply(student, teacher, float(student_scale), float(teacher_scale), int(block_rows))
