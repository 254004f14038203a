"""The per-row value flags of the sampling kernels: one bit per fault they find while reading a row.

Every backend sets these bits: the Triton kernel (genfast/kernels/sampling.py), the C++ CPU and CUDA kernels
(csrc/common/sampling.h, whose ``kFlag*`` constants a test compares with this enum) and the reference
(``genfast.ops.sampling._value_flags_ref``); genfast/ops/sampling.py turns them into errors that name the
argument. It lives with the kernels, the lowest layer that uses it, so that the ops can import it downward.
"""

import enum


class SamplingFlag(enum.IntFlag):
    NAN = 1  # a logit is NaN
    POS_INF = 2  # a logit is +inf
    ALL_NEG_INF = 4  # no logit of the row is above -inf
    OVERFLOW = 8  # a finite logit / temperature is +-inf
    TEMPERATURE = 16  # temperature NaN, negative or infinite
    TOP_K = 32  # top_k < 0
    TOP_P = 64  # top_p NaN or outside (0, 1]
    MIN_P = 128  # min_p NaN or outside [0, 1]
