"""The shared core of RLAIF-V: the model-family interface, inference helpers, data, DPO training and feedback."""

from muffin.family import ModelFamily, Sample, detect_family, known_families, load_family

__all__ = ["ModelFamily", "Sample", "detect_family", "known_families", "load_family"]
