"""Building blocks shared by every model: residual blocks, resampling, attention."""

from ldm_jax.nn.attention import MultiHeadSelfAttention, SpatialSelfAttention, dot_product_attention
from ldm_jax.nn.layers import Downsample, ResnetBlock, Upsample, check_group_norm
