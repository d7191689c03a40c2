"""Batched LoRA: slot buffers, per-step batch metadata, and the mixed-adapter ops."""
