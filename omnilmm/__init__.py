"""OmniLMM 12B (policy and labeler of RLAIF-V 12B) and the MiniCPM-Llama3-V 2.5 labeler/sampler families."""
