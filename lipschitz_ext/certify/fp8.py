"""Static fp8 attention scales set from the model's own certificate: no amax history,
and no entry of a scaled q, k, v exceeds e4m3's range (:mod:`lipschitz_ext.nn.fp8_scales`)."""

from __future__ import annotations

from ..nn.fp8 import fp8_backend_of
from ..nn.fp8_scales import fp8_scales_from_certificate
from .certificate import certify

__all__ = ["configure_fp8_attention"]


def configure_fp8_attention(model, backend=None) -> tuple[float, float, float]:
    """Certify ``model`` (a ``LipschitzGPT``) and set its ``"fp8"`` backend's static scales
    (the model's own instance, :func:`lipschitz_ext.nn.fp8_backend_of`, unless ``backend`` is given).

    The domain is the model's own inputs: token embeddings, whose per-token RMS is
    at most ``model.embed.max_row_rms()``. Weights change in training, so call this
    again after weight updates whose norms may have grown (with weight caps the
    certificate, hence the scales, stays put). Returns the scales set.
    """
    if backend is None:
        backend = fp8_backend_of(model)
        if backend is None:
            raise ValueError("configure_fp8_attention: the model does not use the 'fp8' attention backend "
                             "(pass backend= to configure another instance)")
    cert = certify(model, input_rms=max(model.embed.max_row_rms(), 2.0**-126))
    scales = fp8_scales_from_certificate(cert, model.config.d_model, model.config.d_head)
    backend.scales = scales
    return scales
