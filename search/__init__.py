"""The search layer: Ray Tune + Optuna drivers, tracking, and the accuracy-vs-FLOPs front."""

__all__ = []
