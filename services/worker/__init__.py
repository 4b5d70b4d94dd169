"""Worker: runs a Hugging Face causal LM block-wise and applies keep masks to its KV cache."""
