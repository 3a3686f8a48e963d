"""Training: one config (``config``: TrainConfig and its LoRA preset), the causal-LM loop on token streams
(``lm``, with its loss in ``lm_loss`` and its I/O in ``lm_io``), the prompt/completion loop (``examples``),
what both loops share (``optim``) and LoRA adapter training (``lora``). May import ``experts.data`` and
``experts.repository``."""
