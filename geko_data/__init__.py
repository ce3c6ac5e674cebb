"""geko_data: GEKO as a data-pipeline component."""

from geko_data.config import GEKO_AGGRESSIVE, GEKO_BALANCED, GEKO_CONSERVATIVE, GEKOConfig
from geko_data.world import World

__version__ = "0.1.0"

__all__ = ["GEKOConfig", "GEKO_AGGRESSIVE", "GEKO_BALANCED", "GEKO_CONSERVATIVE", "World", "__version__"]
