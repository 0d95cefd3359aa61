"""Decoder-only transformers (Llama, Mistral, Qwen2/2.5, Qwen3, OPT), weight loading, tokenizers."""
