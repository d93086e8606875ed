"""Independent float64 reference for the relation cross-entropy (written from the definition, not the package)."""
from __future__ import annotations

import torch


def reference_rows(student: torch.Tensor, teacher: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """Per-group mean over rows of CE_i = lse_j(S_ij) - Σ_j softmax(T_i)_j S_ij, in float64; (G,)."""
    s = student.double()
    t = teacher.detach().double()
    S = a * torch.einsum("gid,gjd->gij", s, s)
    T = b * torch.einsum("gid,gjd->gij", t, t)
    m = S.max(-1, keepdim=True).values.detach()
    lse = (S - m).exp().sum(-1).log() + m.squeeze(-1)
    mt = T.max(-1, keepdim=True).values
    e = (T - mt).exp()
    p_t = e / e.sum(-1, keepdim=True)
    return (lse - (p_t * S).sum(-1)).mean(-1)


def reference_loss(student, teacher, a, b, weights=None) -> torch.Tensor:
    per_group = reference_rows(student, teacher, a, b)
    if weights is None:
        return per_group.mean()
    w = weights.double()
    return (per_group * w).sum() / w.sum()


def reference_grad(student, teacher, a, b, weights=None) -> torch.Tensor:
    """d(reference loss)/d(student) in float64 via autograd."""
    s = student.detach().double().requires_grad_(True)
    (g,) = torch.autograd.grad(reference_loss(s, teacher, a, b, weights), s)
    return g


def make_inputs(G, R, Ds, Dt, dtype=torch.float32, seed=0, normalize=False):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(G, R, Ds, generator=gen, dtype=torch.float64)
    t = torch.randn(G, R, Dt, generator=gen, dtype=torch.float64)
    if normalize:
        s = torch.nn.functional.normalize(s, dim=-1)
        t = torch.nn.functional.normalize(t, dim=-1)
    return s.to(dtype), t.to(dtype)
