"""The core every method stands on: prunable units and filter surgery (``surgery``), FLOPs,
parameters, latency and accuracy (``metrics``), and the model registry with its outside sources
(``models``, ``model_registry``, ``sources``; the detection and segmentation networks in
``dense_models``).

Nothing here knows about criteria, fine-tuning or configs; ``trainables.criteria`` and
``trainables.protocol`` build on it. Plain PyTorch and torch-pruning only.
"""
