"""Hugging Face models: loading and cache, validation, generation, chat templates, tokenizers, LoRA."""
