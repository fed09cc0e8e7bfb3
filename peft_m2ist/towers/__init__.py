"""Any Hugging Face vision or text tower, run frozen: where its blocks and taps are (`layouts`), how it is run
(`forward`), its outputs as tokens on one grid (`tokens`, `features`), the input checks (`validation`), a pair of
towers run on a batch with its taps recording (`encoder`, `recording`), the frozen batch norms, towers kept with
int8 weights (`quantization`), and `VisionTextPair`, the container of two towers."""

from .features import TowerFeatures
from .pair import VisionTextPair

__all__ = ["TowerFeatures", "VisionTextPair"]
