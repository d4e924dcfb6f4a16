"""Integrations with other frameworks. ``transformers_moe``: swap a Hugging Face MoE model's experts (or
sparse blocks) for composer layers. Importing the submodules needs ``transformers`` only where they say so."""
