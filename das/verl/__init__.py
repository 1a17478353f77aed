"""DAS inside verl 0.9.1: the config hook and config group, the plugin, per-step metrics, the
prompt-affine router, the rollout server, worker extension and agent loop.

Importing this package imports nothing of verl (the verl plugin runs during ``import verl``).
"""
