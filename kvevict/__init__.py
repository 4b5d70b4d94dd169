"""kvevict: KV-cache token eviction for LLM serving."""
