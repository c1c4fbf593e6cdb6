"""Adapters that make transformers' vision-language models groundable (``grounding.protocol.GroundableModel``):
one module per family, a shared base, and a registry ``name -> loader`` (``grounding.hf.registry``)."""
