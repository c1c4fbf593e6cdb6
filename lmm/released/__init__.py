"""Released checkpoints in their own layouts, loaded into the project's LMM: weight files, Llama assembly,
LLaVA-1.5 (``llava15``), DiffLMM (``difflmm``), and a random-weight LLaVA-1.5 writer for tests and timing."""
