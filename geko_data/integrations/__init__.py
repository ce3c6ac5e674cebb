"""Framework integrations: ``geko_data.integrations.hf`` (transformers ``Trainer``, TRL ``SFTTrainer``) and
``geko_data.integrations.lightning`` (a Lightning callback).

Each submodule imports its framework when it is imported, never before: ``import geko_data`` stays free of
transformers and lightning.
"""
