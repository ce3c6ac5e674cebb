"""geko_data: GEKO as a data-pipeline component.

``GEKOSampler`` (map-style datasets, and WebDataset shards through ``ShardDataset``) and ``GEKOStream``
(WebDataset shards) skip what the model has mastered and repeat what it gets confidently wrong; the
training loop reports per-sample losses back through ``report``; ``SampleState`` keeps the per-sample
learning state in Arrow files.
"""

from __future__ import annotations

import importlib
from typing import Any

from geko_data.config import (GEKO_AGGRESSIVE, GEKO_BALANCED, GEKO_CONSERVATIVE, GEKOLIB_DEFAULTS, PRESETS,
                              GEKOConfig)
from geko_data.world import World

__version__ = "0.1.0"

# Heavier modules load on first use, so `import geko_data` stays cheap in DataLoader workers.
_LAZY = {
    "EpochPlan": "geko_data.plan",
    "Feedback": "geko_data.feedback",
    "GEKOBatchSampler": "geko_data.batches",
    "FingerprintError": "geko_data.state",
    "GEKOSampler": "geko_data.sampler",
    "GEKOStream": "geko_data.stream",
    "PartitionStats": "geko_data.state",
    "SampleState": "geko_data.state",
    "ShardDataset": "geko_data.dataset",
    "ShardError": "geko_data.shards",
    "StateFileError": "geko_data.state",
    "fingerprint_of": "geko_data.state",
    "index_shards": "geko_data.shards",
    "read_index": "geko_data.shards",
    "write_shards": "geko_data.shards",
}

__all__ = sorted([
    "GEKOConfig", "GEKOLIB_DEFAULTS", "GEKO_AGGRESSIVE", "GEKO_BALANCED", "GEKO_CONSERVATIVE", "PRESETS",
    "World", "__version__", *_LAZY,
])


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'geko_data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
