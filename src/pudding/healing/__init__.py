"""Stage 2, healing (optional): LoRA adapters that recover a pruned model's quality, and their loading."""
