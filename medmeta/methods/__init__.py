"""Methods: an initialisation (where the backbone starts) plus an adaptation rule (what it does
with an episode). ``base`` holds the interface; ``initialisations`` and ``rules`` the built-ins."""
from .base import AdaptationRule, InitContext, Initialisation, Method, Sources
from .initialisations import MMPT, Checkpoint, ImageNet, MAMLInit, Pretrained, Scratch
from .rules import KNN, LPFT, FineTune, FrozenFeatureRule, LinearProbe, MAMLInner, Prototypes

__all__ = ["AdaptationRule", "Checkpoint", "FineTune", "FrozenFeatureRule", "ImageNet",
           "InitContext", "Initialisation", "KNN", "LPFT", "LinearProbe", "MAMLInit", "MAMLInner", "MMPT", "Method",
           "Pretrained", "Prototypes", "Scratch", "Sources"]
