"""Remote-code files of the tiny MiniCPM-Llama3-V 2.5 look-alike; ``omnilmm.tiny`` copies them into a checkpoint.

They are loaded by transformers' ``trust_remote_code`` machinery from the checkpoint directory, not imported from
here; they mirror the public interface of ``openbmb/MiniCPM-Llama3-V-2_5``'s code with toy internals.
"""
