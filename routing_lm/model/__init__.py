"""The routed Transformer: `Transformer`, its routed FFW, dispatch and parameter counts."""
from routing_lm.model.transformer import Transformer, build, routed_layer_indices
