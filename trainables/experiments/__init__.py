"""A paper's own experiments, built on the protocol rather than part of it.

Abbasi-Asl and Yu (2017): ``compression`` (CAR-pruned layers, then Deep Compression's weight
pruning and quantisation) and ``colour`` (are the pruned filters colour-selective?). Their
command lines are ``python -m trainables.compress`` and ``python -m trainables.colour_report``.
"""
