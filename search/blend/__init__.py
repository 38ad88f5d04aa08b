"""The blended-criterion search of He et al. 2021: criteria clustering (``clustering``), which
units share factors (``layout``: global, per stage, per unit), the short-fine-tune proxy's
step count (``proxy``) and one candidate per set of pruned filters (``dedupe``) here; the
calibration factors are searched by ``python -m search.launch search=blended``."""

__all__ = []
