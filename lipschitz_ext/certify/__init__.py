"""Certified Lipschitz bounds, and the attacks that test them (theorems and proofs: docs/certificate.md).

    from lipschitz_ext.certify.certificate import certify
    cert = certify(model)                       # a LipschitzGPT -> Certificate
    print(cert); cert.to_json()

- ``certificate.py``: :func:`certify`, :class:`Certificate`, :func:`worst_case_certificate`,
  :func:`check_certifiable` (what the certificate refuses to see).
- ``bounds.py``: per-block bounds of attention and MLP branches; ``domain.py``: the token domain.
- ``published.py``: the published formula (:func:`paper_bound`, unsound, for comparison).
- ``attacks.py``: lower bounds by search (:func:`empirical_lipschitz`, :func:`attack_lipschitz`);
  ``robustness.py``: the embedding-space PGD attack and :func:`certified_radius`.
- ``classifier.py``: the MLP classifier's l2 bound, certified radii and PGD-l2 attack.
- ``fp8.py``: static fp8 attention scales from the certificate.
"""

from .attacks import attack_lipschitz, empirical_lipschitz
from .bounds import attention_bounds, mlp_block_bound, mlp_block_gain, mlp_bounds, sequence_norm
from .certificate import Certificate, CertificateRow, certify, check_certifiable, worst_case_certificate
from .classifier import certified_accuracy, certified_radii, l2_bound, pgd_l2, soundness_check
from .domain import TokenDomain, attention_bound_on_domain
from .fp8 import configure_fp8_attention
from .published import paper_bound
from .robustness import certified_radius, pgd_attack

__all__ = ["Certificate", "CertificateRow", "TokenDomain", "attack_lipschitz", "attention_bound_on_domain",
           "attention_bounds", "certified_accuracy", "certified_radii", "certified_radius", "certify",
           "check_certifiable", "configure_fp8_attention", "empirical_lipschitz", "l2_bound", "mlp_block_bound",
           "mlp_block_gain", "mlp_bounds", "paper_bound", "pgd_attack", "pgd_l2", "sequence_norm", "soundness_check",
           "worst_case_certificate"]
