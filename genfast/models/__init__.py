"""The models built on genfast's kernels, one readable file each (one import line per model, appended)."""

from genfast.models import numbergan  # noqa: F401, I001
from genfast.models import dcgan  # noqa: F401, I001
from genfast.models import cgan  # noqa: F401, I001
