"""Building blocks shared by every model: residual blocks, resampling, attention."""

from ldm_jax.nn.attention import (AttentionConfig, MultiHeadSelfAttention, SpatialSelfAttention,
                                  check_implementation, dot_product_attention)
from ldm_jax.nn.conv import Conv1x1, Conv3x3, conv3x3
from ldm_jax.nn.layers import Downsample, GroupNorm, ResnetBlock, Upsample, check_group_norm, group_norm
