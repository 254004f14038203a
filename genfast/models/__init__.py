"""genfast's models: one readable file each, built on genfast's ops and modules."""

import genfast.models.cyclegan  # noqa: F401
import genfast.models.vae  # noqa: F401
