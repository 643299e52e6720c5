"""The generic family for any transformers image-text-to-text VLM (``family``) and its tiny test checkpoints (``tiny``)."""
