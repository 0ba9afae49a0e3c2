"""Shared pieces of the Accelerate trainers (pretraining, MOPD, RL), imported as ``keye_vl.training.<module>``."""
