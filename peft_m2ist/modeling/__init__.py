"""What an adapter adds to the frozen towers, as plain `nn.Module`s: the M3ISA experts, the side network, the
grounding head, its feed-forward block, the box loss and the model output."""

from .head import GroundingHead
from .outputs import ReferringExpressionOutput
from .side_network import M2ISTSideNetwork

__all__ = ["GroundingHead", "M2ISTSideNetwork", "ReferringExpressionOutput"]
