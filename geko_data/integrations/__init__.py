"""Framework integrations: ``geko_data.integrations.hf`` (transformers ``Trainer``, TRL ``SFTTrainer``),
``geko_data.integrations.lightning`` (a Lightning callback) and ``geko_data.integrations.accelerate`` (a
GEKO loader in your own accelerate loop).

Each submodule imports its framework when it is imported, never before: ``import geko_data`` stays free of
transformers and lightning.
"""
