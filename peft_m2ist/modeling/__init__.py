"""What an adapter adds to the frozen towers, as plain `nn.Module`s built from the adapter's config (`settings`):
the M3ISA experts, the side network, the grounding head, its feed-forward block, the box loss, the model output and
the REC forward from the towers' features to a box (`grounding`)."""

from .head import GroundingHead
from .outputs import ReferringExpressionOutput
from .side_network import M2ISTSideNetwork

__all__ = ["GroundingHead", "M2ISTSideNetwork", "ReferringExpressionOutput"]
