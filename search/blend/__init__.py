"""The blended-criterion search of He et al. 2021: criteria clustering (``clustering``) here;
the calibration factors are searched by ``python -m search.launch search=blended``."""

__all__ = []
