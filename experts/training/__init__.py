"""Training: one config, the causal-LM loop and the LoRA loop."""
