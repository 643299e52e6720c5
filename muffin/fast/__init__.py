"""The speed machinery behind the family interface: shared-prefix packing (layout, attention, compiled layers,
chunked log-probs, the plan/run API), FlashAttention varlen, seeded LoRA dropout and shared-prefix generation."""
