"""Visual encoders: the interface (``encoders.base``), image transforms (``encoders.transform``), the config
schema (``encoders.config``), the registry (``encoders.registry``) and the built-in CLIP, diffusion (DiffLMM)
and fused encoders. Importing the package imports nothing heavy: the schema loads without torch."""
