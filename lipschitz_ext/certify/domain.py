"""The token domain: a Minkowski sum of ellipsoids every residual-stream token lies in,
and the attention bound on it (Theorem 7 of docs/certificate.md)."""

from __future__ import annotations

import math

import torch

from ..nn.attention import LipschitzAttention
from .bounds import _attention_bounds, _shape_of, _sigma, _sigmas, SIGMA_MARGIN

__all__ = ["DOMAIN_TERMS", "TokenDomain", "attention_bound_on_domain"]

DOMAIN_TERMS = 12


def _sqrt_factor(W: torch.Tensor, d: int) -> torch.Tensor:
    """A ``d x d`` matrix ``F`` with ``F F^T = W W^T`` for ``W [d, n]`` (so ``W B_n = F B_d``, B the unit
    ball): the transposed R factor of ``W^T = Q R``, zero-padded when ``n < d``."""
    R = torch.linalg.qr(W.mT, mode="r").R  # [min(n, d), d]
    F = R.mT
    return F if F.shape[1] == d else torch.cat((F, F.new_zeros(d, d - F.shape[1])), dim=1)


class TokenDomain:
    """A convex set every residual-stream token lies in: ``D = E_1 B + ... + E_m B`` (Minkowski sum of
    centred ellipsoids, ``B`` the unit l2 ball of ``R^d``, plain l2 units), Theorem 7 of docs/certificate.md.

    Starts as the ball of per-token RMS ``radius`` and follows the sub-layers: attention maps it to
    ``(1 - alpha) D + alpha phi sum_h M_h D`` (:meth:`attention`), the MLP sub-layer to
    ``[(1 - alpha) I + alpha/(2 kappa) W_out W_in] D + alpha/(2 kappa) R_in W_out B`` (:meth:`mlp`),
    where ``R_in`` bounds ``||W_in x||`` on ``D``. :meth:`sup_norms` bounds ``sup_{x in D} ||P x||``.
    """

    def __init__(self, d: int, radius: float) -> None:
        self.d = d
        # D = unit * sum_i E_i B: the scalar keeps the matrices of order 1 for any radius (every map is linear)
        self.unit = radius * math.sqrt(d)
        self.E = torch.eye(d, dtype=torch.float64)[None]  # [m, d, d]

    def sup_norms(self, P: torch.Tensor, iters: int = 3) -> torch.Tensor:
        """Upper bounds of ``sup_{x in D} ||P_k x||_2`` for ``P [k, p, d]`` -> ``[k]``, float64.

        ``sup_{z_i in B} ||sum_i P E_i z_i|| = sup_{||u|| = 1} sum_i ||E_i^T P^T u||`` is bounded by the
        triangle inequality ``sum_i ||P E_i||`` and, for any weights ``w_i > 0``, by Cauchy-Schwarz:
        ``sum_i ||b_i|| <= (sum_i 1/w_i)^(1/2) (sum_i w_i ||b_i||^2)^(1/2)``, whose sup over ``u`` is
        ``(sum_i 1/w_i)^(1/2) lambda_max(sum_i w_i B_i B_i^T)^(1/2)``. The weights are refined from the
        top eigenvector (any positive weights are valid; the smallest value found is returned).
        """
        P = P.detach().double()
        if P.shape[-2] > self.d:  # ||P x|| = ||R x||, R the d x d QR factor of P
            P = torch.linalg.qr(P, mode="r").R
        B = P[:, None] @ self.E[None]  # [k, m, p, d]
        nb = _sigmas(B)  # [k, m], rounded up
        best = nb.sum(-1)
        scale = nb.amax(-1)  # work with B / scale: weights and Gram matrices of order 1
        live = (scale > 0) & torch.isfinite(scale)
        if not bool(live.any()):
            return best * self.unit
        B, nb, scale = B[live] / scale[live, None, None, None], nb[live] / scale[live, None], scale[live]
        w = 1.0 / nb.clamp_min(1e-12)
        cs = torch.full_like(scale, math.inf)
        gram = B @ B.mT  # [k, m, p, p]
        for _ in range(iters):
            S = (w[..., None, None] * gram).sum(1)  # [k, p, p]
            try:
                lam, U = torch.linalg.eigh(S)
            except torch.linalg.LinAlgError:  # keep what is proven so far (the triangle bound at least)
                break
            val = ((1.0 / w).sum(-1) * lam[..., -1].clamp_min(0.0)).sqrt() * (1.0 + SIGMA_MARGIN)
            cs = torch.minimum(cs, torch.where(torch.isfinite(val), val, math.inf))
            g = (B.mT @ U[:, None, :, -1:]).squeeze(-1).norm(dim=-1)  # ||B_i^T u||: the optimal w_i ~ 1/g_i
            w = 1.0 / g.maximum(1e-6 * nb).clamp_min(1e-12)
            w = w / w.amax(-1, keepdim=True)
        best[live] = torch.minimum(best[live], cs * scale)
        return best * self.unit

    def _set(self, E: torch.Tensor) -> None:
        nonzero = torch.linalg.matrix_norm(E) > 0
        E = E[nonzero] if bool(nonzero.any()) else E[:1]
        while E.shape[0] > DOMAIN_TERMS:
            # E_1 B + E_2 B lies in the ellipsoid F B, F F^T = (1 + 1/p) E_1 E_1^T + (1 + p) E_2 E_2^T
            # ((a + b)^2 <= (1 + 1/p) a^2 + (1 + p) b^2 for the support functions); p trace-optimal
            fro = torch.linalg.matrix_norm(E)
            i, j = fro.argsort()[:2].tolist()
            p = (fro[j] / fro[i]).item()
            F = torch.cat((math.sqrt(1 + 1 / p) * E[i], math.sqrt(1 + p) * E[j]), dim=1)
            keep = [t for t in range(E.shape[0]) if t not in (i, j)]
            E = torch.cat((E[keep], _sqrt_factor(F, self.d)[None]))
        self.E = E

    def attention(self, alpha: float, phi: float, M: torch.Tensor) -> None:
        """``D <- (1 - alpha) D + alpha phi sum_h M_h D`` (``M [H, d, d]``, the heads' ``W_o^h W_v^h``)."""
        heads = (alpha * phi) * (M.double()[:, None] @ self.E[None]).flatten(0, 1)
        self._set(torch.cat(((1 - alpha) * self.E, heads)))

    def mlp(self, alpha: float, kappa: float, W_in: torch.Tensor, W_out: torch.Tensor) -> None:
        """``D <- A D + alpha/(2 kappa) R_in W_out B`` with ``A = (1 - alpha) I + alpha/(2 kappa) W_out W_in``."""
        W_in, W_out = W_in.detach().double(), W_out.detach().double()
        half = alpha / (2 * kappa)
        r_in = self.sup_norms(W_in[None]).item() / self.unit  # in the units of E
        A = half * (W_out @ W_in)
        A.diagonal().add_(1.0 - alpha)
        self._set(torch.cat((A[None] @ self.E, (half * r_in) * _sqrt_factor(W_out, self.d)[None])))

    def radius(self) -> float:
        """Upper bound of the per-token RMS on ``D``."""
        return self.sup_norms(torch.eye(self.d, dtype=torch.float64)[None]).item() / math.sqrt(self.d)


def _head_maps(attn: LipschitzAttention) -> torch.Tensor:
    """``M_h = W_o^h W_v^h`` of every head, ``[H, d, d]`` float64."""
    H, dh = attn.n_heads, attn.d_head
    Wv, Wo = attn.v.weight.detach().double(), attn.o.weight.detach().double()
    return Wo.view(Wo.shape[0], H, dh).permute(1, 0, 2) @ Wv.view(H, dh, -1)


def attention_bound_on_domain(attn: LipschitzAttention, a: float, dom: TokenDomain,
                              max_len: int | None = None, *, theorem5: float | None = None,
                              rho: torch.Tensor | None = None) -> float:
    """Lipschitz bound of the attention branch on inputs whose tokens lie in ``dom`` and have per-token
    RMS <= ``a`` (Theorem 7 of docs/certificate.md): Theorem 5 with the domain's projected radii
    ``sup ||W_k^h x||, sup ||W_q^h x||, sup ||W_v^h x||, sup ||M_h x||`` in place of ``||W^h|| a sqrt(d)``.
    Never above :func:`attention_bounds` (``refined``) for the same ``a``. ``theorem5``, ``rho``: that
    bound and its ``rho_h`` when the caller has them (from the same weights and ``max_len``), not recomputed."""
    if theorem5 is None:
        theorem5, _, _, rho = _attention_bounds(attn, a, max_len, True)
    lip = theorem5
    if attn.q is None:
        return lip
    H, dh, d = attn.n_heads, attn.d_head, attn.d_model
    rows = lambda W: W.detach().double().view(H, dh, -1)  # noqa: E731
    Wq, Wk, Wv = rows(attn.q.weight), rows(attn.k.weight), rows(attn.v.weight)
    M = _head_maps(attn)
    sq, sk, sv, m = _sigmas(Wq), _sigmas(Wk), _sigmas(Wv), _sigmas(M)
    s_o, s_q = _sigma(attn.o.weight), _sigma(attn.q.weight)
    ball = a * math.sqrt(d)
    A2 = min(ball, dom.sup_norms(torch.eye(d, dtype=torch.float64)[None]).item())
    K = torch.minimum(sk * A2, dom.sup_norms(Wk))
    Q = torch.minimum(sq * A2, dom.sup_norms(Wq))
    Vv = torch.minimum(sv * A2, dom.sup_norms(Wv))
    # ||M_h x|| = ||R_h W_v^h x|| with W_o^h = Q_h R_h: a d_h-row projection instead of d rows
    Wo_cols = attn.o.weight.detach().double().view(d, H, dh).permute(1, 0, 2)
    Mm = torch.minimum(m * A2, dom.sup_norms(torch.linalg.qr(Wo_cols, mode="r").R @ Wv))
    q_all = min(s_q * A2, dom.sup_norms(attn.q.weight[None]).item())
    rho = sq * sk if rho is None else torch.minimum(rho, sq * sk)
    f, scale, _, _ = _shape_of(attn)
    sc = scale / dh
    by_form = (s_o * (rho * Vv).norm().item() * A2, (rho * Mm).sum().item() * A2)  # |l| <= rho ||x_t|| ||x_s||
    y_q = sc * min(s_o * min(s_q * (K * Vv).max().item(), (sq * K * Vv).norm().item()),
                   (sq * K * Mm).sum().item(), s_q * (K * Mm).norm().item(), *by_form)
    y_k = sc * min(s_o * min(q_all * (sk * Vv).max().item(), (Q * sk * Vv).norm().item()),
                   (Q * sk * Mm).sum().item(), q_all * (sk * Mm).norm().item(), *by_form)
    v_path = min(s_o * sv.norm().item(), m.sum().item())
    # y_q, y_k multiply ||delta_t||_2 <= sqrt(d) eps, as Theorem 5's c DQ' does
    val = f * (v_path + y_q + y_k)
    return min(lip, val) if math.isfinite(val) else lip  # an overflow keeps Theorem 5


