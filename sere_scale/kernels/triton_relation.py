"""Fused Triton relation cross-entropy: never materialises an R×R matrix (see docs/KERNELS.md).

Forward, one program per (group, row block): streams column tiles of S = a·XsXsᵀ and T = b·XtXtᵀ and keeps, per
row, the running maxima m_s, m_t and sums l_s = Σ_j exp(S_ij - m_s), l_t = Σ_j exp(T_ij - m_t), and the running
A = Σ_j exp(T_ij - m_t) (m_s - S_ij) (when m_s grows by δ, A += δ·l_t; when m_t grows, A and l_t scale by
exp(-Δm_t)), so CE_i = A / l_t + log l_s comes out of a single pass as a sum of two terms >= 0 (the form
lse_s - Σ_j p_t_ij S_ij cancels two numbers near the largest logit and loses digits when relations are sharp).
Saved for backward: the inputs and four floats per row (m_s, log l_s, m_t, log l_t): softmax = exp((S - m) - log l)
keeps the precision that lse = m + log l would round away at the logits' magnitude.

Backward, one program per (group, D chunk, row block): both Gram matrices are symmetric, so
dX_i = c_g Σ_j (dS_ij + dS_ji) X_j with dS_ij = softmax(S)_ij - p_t_ij, and dS_ji only needs the column
statistics lse_s_j, lse_t_j. Every program owns its output rows: no atomics, no transposed pass.

Imported lazily by the dispatcher; this module imports triton at import time. Under ``TRITON_INTERPRET=1`` the
kernels run on CPU tensors (bf16 operands are upcast there: the interpreter's bf16 ``tl.dot`` is broken).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from sere_scale.kernels import add_kernel_flops

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class TritonBlocks:
    block_m: int = 64
    block_n: int = 64
    block_k: int | None = None  # default: next power of two of D, clamped to [16, 64]
    block_d: int | None = None  # dX columns per backward program; default: next pow2 of Ds, clamped to [16, 128]
    num_warps: int = 4


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _gram_tile(x_ptr, offs_m, offs_n, R, D, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """X[offs_m] @ X[offs_n]ᵀ for one group of a contiguous (R, D) matrix, fp32 accumulation; masked rows are 0."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(x_ptr + offs_m[:, None] * D + kk[None, :],
                    mask=(offs_m[:, None] < R) & (kk[None, :] < D), other=0.0)
        b = tl.load(x_ptr + offs_n[None, :] * D + kk[:, None],
                    mask=(offs_n[None, :] < R) & (kk[:, None] < D), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _relation_ce_fwd(s_ptr, t_ptr, ce_ptr, m_s_ptr, ll_s_ptr, m_t_ptr, ll_t_ptr, R, DS, DT, s_scale, t_scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     UPCAST_S: tl.constexpr, UPCAST_T: tl.constexpr, IEEE_S: tl.constexpr, IEEE_T: tl.constexpr):
    # 1-D grid, row blocks of one group adjacent (they share the group's X in L2); G may exceed 65535.
    pid = tl.program_id(0)
    n_m = tl.cdiv(R, BLOCK_M)
    pid_m = pid % n_m
    g = (pid // n_m).to(tl.int64)
    s_base = s_ptr + g * R * DS
    t_base = t_ptr + g * R * DT
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_s = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_s = tl.zeros((BLOCK_M,), tl.float32)
    m_t = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_t = tl.zeros((BLOCK_M,), tl.float32)
    gap = tl.zeros((BLOCK_M,), tl.float32)  # Σ_j exp(T_ij - m_t_i) (m_s_i - S_ij), every term >= 0
    for n0 in range(0, R, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid = (offs_n < R)[None, :]
        s = _gram_tile(s_base, offs_m, offs_n, R, DS, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST_S, IEEE_S) * s_scale
        t = _gram_tile(t_base, offs_m, offs_n, R, DT, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST_T, IEEE_T) * t_scale
        s_inf = tl.where(valid, s, float("-inf"))
        t_inf = tl.where(valid, t, float("-inf"))
        m_s_new = tl.maximum(m_s, tl.max(s_inf, 1))
        l_s = l_s * tl.exp(m_s - m_s_new) + tl.sum(tl.exp(s_inf - m_s_new[:, None]), 1)
        # shift the terms summed so far to the new student max (l_t = 0 before the first tile: m_s was -inf)
        gap = gap + tl.where(l_t > 0, m_s_new - m_s, 0.0) * l_t
        m_s = m_s_new
        m_t_new = tl.maximum(m_t, tl.max(t_inf, 1))
        alpha = tl.exp(m_t - m_t_new)
        e_t = tl.exp(t_inf - m_t_new[:, None])
        l_t = l_t * alpha + tl.sum(e_t, 1)
        gap = gap * alpha + tl.sum(e_t * tl.where(valid, m_s[:, None] - s, 0.0), 1)
        m_t = m_t_new
    ll_s = tl.log(l_s)
    row_ok = offs_m < R
    out = g * R + offs_m
    tl.store(ce_ptr + out, gap / l_t + ll_s, mask=row_ok)
    tl.store(m_s_ptr + out, m_s, mask=row_ok)
    tl.store(ll_s_ptr + out, ll_s, mask=row_ok)
    tl.store(m_t_ptr + out, m_t, mask=row_ok)
    tl.store(ll_t_ptr + out, tl.log(l_t), mask=row_ok)


@triton.jit
def _relation_ce_bwd(s_ptr, t_ptr, m_s_ptr, ll_s_ptr, m_t_ptr, ll_t_ptr, coef_ptr, dx_ptr, R, DS, DT, s_scale,
                     t_scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                     UPCAST_S: tl.constexpr, UPCAST_T: tl.constexpr, IEEE_S: tl.constexpr, IEEE_T: tl.constexpr):
    pid = tl.program_id(0)
    n_m = tl.cdiv(R, BLOCK_M)
    n_d = tl.cdiv(DS, BLOCK_D)
    pid_m = pid % n_m
    pid_d = (pid // n_m) % n_d
    g = (pid // (n_m * n_d)).to(tl.int64)
    s_base = s_ptr + g * R * DS
    t_base = t_ptr + g * R * DT
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = offs_m < R
    m_s_i = tl.load(m_s_ptr + g * R + offs_m, mask=row_ok, other=0.0)
    ll_s_i = tl.load(ll_s_ptr + g * R + offs_m, mask=row_ok, other=0.0)
    m_t_i = tl.load(m_t_ptr + g * R + offs_m, mask=row_ok, other=0.0)
    ll_t_i = tl.load(ll_t_ptr + g * R + offs_m, mask=row_ok, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, R, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < R
        s = _gram_tile(s_base, offs_m, offs_n, R, DS, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST_S, IEEE_S) * s_scale
        t = _gram_tile(t_base, offs_m, offs_n, R, DT, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST_T, IEEE_T) * t_scale
        m_s_j = tl.load(m_s_ptr + g * R + offs_n, mask=col_ok, other=0.0)
        ll_s_j = tl.load(ll_s_ptr + g * R + offs_n, mask=col_ok, other=0.0)
        m_t_j = tl.load(m_t_ptr + g * R + offs_n, mask=col_ok, other=0.0)
        ll_t_j = tl.load(ll_t_ptr + g * R + offs_n, mask=col_ok, other=0.0)
        # dS_ij + dS_ji (up to c_g) as exp((x - m) - log l); every exponent is <= 0 (up to rounding) because the
        # max bounds its own row and column and log l >= 0.
        p = (tl.exp((s - m_s_i[:, None]) - ll_s_i[:, None]) + tl.exp((s - m_s_j[None, :]) - ll_s_j[None, :])
             - tl.exp((t - m_t_i[:, None]) - ll_t_i[:, None]) - tl.exp((t - m_t_j[None, :]) - ll_t_j[None, :]))
        p = tl.where(col_ok[None, :], p, 0.0)
        x_j = tl.load(s_base + offs_n[:, None] * DS + offs_d[None, :],
                      mask=col_ok[:, None] & (offs_d[None, :] < DS), other=0.0)
        if UPCAST_S:
            x_j = x_j.to(tl.float32)
        if IEEE_S:
            acc = tl.dot(p.to(x_j.dtype), x_j, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(x_j.dtype), x_j, acc)
    coef = tl.load(coef_ptr + g)
    dx = acc * coef
    tl.store(dx_ptr + g * R * DS + offs_m[:, None] * DS + offs_d[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < DS))


def _pow2_clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


def cuda_matmul_allows_tf32() -> bool:
    """Whether fp32 matmuls may use TF32, as torch's cuBLAS setting says. Read through the new precision API
    (torch >= 2.9: ``torch.backends.cuda.matmul.fp32_precision``, which also reflects the legacy flag and the
    inherited ``torch.backends.fp32_precision``): once a program has set the new API, reading the legacy
    ``allow_tf32`` raises a RuntimeError."""
    prec = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if prec is not None:
        return prec == "tf32"
    return bool(torch.backends.cuda.matmul.allow_tf32)


def _flags(x: torch.Tensor):
    """(UPCAST, IEEE) constexprs for an operand: fp32 operands use IEEE products unless torch allows TF32."""
    upcast = interpreting() and x.dtype == torch.bfloat16
    ieee = x.dtype == torch.float32 and not (x.is_cuda and cuda_matmul_allows_tf32())
    return upcast, ieee


class _TritonRelationCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, student_scale, teacher_scale, blocks):
        s = student.detach().contiguous()
        t = teacher.detach().contiguous()
        groups, rows, ds = s.shape
        dt = t.shape[2]
        block_k = blocks.block_k or _pow2_clamp(max(ds, dt), 16, 64)
        ce = torch.empty(groups, rows, device=s.device, dtype=torch.float32)
        stats = [torch.empty_like(ce) for _ in range(4)]  # m_s, log l_s, m_t, log l_t
        (up_s, ieee_s), (up_t, ieee_t) = _flags(s), _flags(t)
        grid = (triton.cdiv(rows, blocks.block_m) * groups,)
        _relation_ce_fwd[grid](s, t, ce, *stats, rows, ds, dt, student_scale, teacher_scale,
                               BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_K=block_k,
                               UPCAST_S=up_s, UPCAST_T=up_t, IEEE_S=ieee_s, IEEE_T=ieee_t,
                               num_warps=blocks.num_warps)
        ctx.save_for_backward(s, t, *stats)
        ctx.meta = (student_scale, teacher_scale, blocks, block_k)
        add_kernel_flops(2 * groups * rows * rows * (ds + dt))  # the two Gram matrices
        return ce.mean(-1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_groups):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        s, t, *stats = ctx.saved_tensors
        student_scale, teacher_scale, blocks, block_k = ctx.meta
        groups, rows, ds = s.shape
        coef = (grad_groups.float() * (student_scale / rows)).contiguous()
        block_d = blocks.block_d or _pow2_clamp(ds, 16, 128)
        dx = torch.empty_like(s)
        (up_s, ieee_s), (up_t, ieee_t) = _flags(s), _flags(t)
        grid = (triton.cdiv(rows, blocks.block_m) * triton.cdiv(ds, block_d) * groups,)
        _relation_ce_bwd[grid](s, t, *stats, coef, dx, rows, ds, t.shape[2], student_scale, teacher_scale,
                               BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_K=block_k, BLOCK_D=block_d,
                               UPCAST_S=up_s, UPCAST_T=up_t, IEEE_S=ieee_s, IEEE_T=ieee_t,
                               num_warps=blocks.num_warps)
        add_kernel_flops(4 * groups * rows * rows * ds)  # (dS + dSᵀ) X: two R×R by R×Ds products
        return dx, None, None, None, None


def relation_ce_rows_triton(student: torch.Tensor, teacher: torch.Tensor, student_scale: float,
                            teacher_scale: float, blocks: TritonBlocks | None = None) -> torch.Tensor:
    """Per-group mean over rows of the relation CE, (G,) fp32, via the fused kernels."""
    for name, x in (("student", student), ("teacher", teacher)):
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"triton relation kernel: unsupported {name} dtype {x.dtype}")
    if student.device != teacher.device:
        raise ValueError(f"student and teacher on different devices: {student.device} vs {teacher.device}")
    if not (student.is_cuda or interpreting()):
        raise RuntimeError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU debugging)")
    if student.shape[0] == 0 or student.shape[1] == 0:
        raise ValueError("triton relation kernel needs G >= 1 and R >= 1")
    return _TritonRelationCE.apply(student, teacher, float(student_scale), float(teacher_scale),
                                   blocks or TritonBlocks())
