"""Independent float64 references for the tests (never the code under test).

Coefficient tables are written out again here from their published sources (docs/theory.md, section 3) so a typo in
the C++ header cannot hide behind itself.
"""

from __future__ import annotations

import torch

JORDAN = [(3.4445, -4.7750, 2.0315)]
YOU = [
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
]
JIACHENG = [
    (3955 / 1024, -8306 / 1024, 5008 / 1024),
    (3735 / 1024, -6681 / 1024, 3463 / 1024),
    (3799 / 1024, -6499 / 1024, 3211 / 1024),
    (4019 / 1024, -6385 / 1024, 2906 / 1024),
    (2677 / 1024, -3029 / 1024, 1162 / 1024),
    (2172 / 1024, -1833 / 1024, 682 / 1024),
]
_PE_RAW = [
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
]
POLAR_EXPRESS = [(a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in _PE_RAW[:-1]] + [_PE_RAW[-1]]

TABLES = {"jordan": JORDAN, "you": YOU, "jiacheng": JIACHENG, "polar_express": POLAR_EXPRESS}
NORM_SCALE = {"jordan": 1.0, "you": 1.0, "jiacheng": 1.0, "polar_express": 1.01}


def triples(name_or_list, steps: int):
    table = TABLES[name_or_list] if isinstance(name_or_list, str) else list(name_or_list)
    return [table[min(i, len(table) - 1)] for i in range(steps)]


def ns_scalar(s: torch.Tensor, name_or_list, steps: int) -> torch.Tensor:
    """The composite odd polynomial applied to (normalized) singular values."""
    s = s.double()
    for a, b, c in triples(name_or_list, steps):
        s = a * s + b * s**3 + c * s**5
    return s


def ns_matrix_f64(G: torch.Tensor, name_or_list, steps: int, eps: float = 1e-7) -> torch.Tensor:
    """The same iteration in float64, written directly (tall inputs via transpose)."""
    X = G.double()
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    scale = NORM_SCALE.get(name_or_list, 1.0) if isinstance(name_or_list, str) else 1.0
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) * scale + eps)
    for a, b, c in triples(name_or_list, steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


def polar_factor_f64(G: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return U @ Vh


def normalized_svals(G: torch.Tensor, name_or_list, eps: float = 1e-7) -> torch.Tensor:
    G = G.double()
    scale = NORM_SCALE.get(name_or_list, 1.0) if isinstance(name_or_list, str) else 1.0
    fro = torch.linalg.matrix_norm(G, keepdim=True)[..., 0]
    return torch.linalg.svdvals(G) / (fro * scale + eps)


def with_spectrum(s: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """A float64 matrix (batch) ``U diag(s) V^T`` with random orthonormal U [m, r], V [n, r].

    ``s``: ``[..., r]`` with ``r <= min(m, n)``; returns ``[..., m, n]``.
    """
    s = s.double()
    r = s.shape[-1]
    U, _ = torch.linalg.qr(torch.randn(*s.shape[:-1], m, r, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(*s.shape[:-1], n, r, dtype=torch.float64))
    return (U * s.unsqueeze(-2)) @ V.mT


def svd_apply_f64(W: torch.Tensor, fn) -> torch.Tensor:
    """``U fn(S) V^T`` in float64: the ground truth for every spectral map."""
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return (U * fn(S).unsqueeze(-2)) @ Vh


def soft_cap_scalar(s: torch.Tensor, a) -> torch.Tensor:
    """The soft cap's scalar map: ``s1 = s - a s^3``, ``f = s1 + a s1^3`` (float64)."""
    s = s.double()
    s1 = s - a * s**3
    return s1 + a * s1**3


HARD_CAP_QUINTIC = [
    (0.805032, 0.206361, -0.019763),
    (0.649867, 0.162935, -0.011150),
    (1.810259, -0.200265, 0.008251),
    (1.004384, -0.183490, 0.014413),
]
