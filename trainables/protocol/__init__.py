"""The prune / fine-tune protocol (Mittal et al. 2019) and what it is made of.

``stages`` runs it (layer by layer, one shot, iterative, greedy CAR) on a base model and emits
records; ``config`` holds its typed settings; ``planning`` and ``schedules`` decide how much of
which unit to prune; ``finetune`` recovers after each step; ``tasks`` is what differs between
classification, detection and segmentation (loss, evaluation, applicable criteria);
``records`` and ``recovery`` are the run record and the speed-of-recovery numbers;
``greedy_car`` is Abbasi-Asl and Yu's greedy method, one of the protocol's methods.

Builds on ``trainables.core`` and ``trainables.criteria``; knows nothing of Hydra or Ray.
"""
