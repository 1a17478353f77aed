"""verl configs for DAS, found by hydra as ``pkg://das.verl.config``.

* ``das/default.yaml``: the ``das`` group. ``+das=default`` turns DAS on in any verl config.
* ``das_grpo.yaml``: a recipe, verl's ``ppo_trainer`` with GRPO and DAS.
* ``agent_loops.yaml``, ``router.yaml``: the agent loop and router that the group names.
"""
