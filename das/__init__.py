"""DAS: distribution-aware speculative decoding for RL rollouts.

The core (this package's modules) joins the suffix trees, the rollout history and the budget
policy into a drafter, independent of any engine. Subpackages, each depending only on those
below it:

* :mod:`das.vllm`: the drafter inside vLLM (proposer, plugin, API, engine helpers);
* :mod:`das.verl`: DAS in verl's RL trainer (config hook, metrics, router, servers);
* :mod:`das.bench`: live benchmark, reports and measurements;
* :mod:`das.cli`: the ``das-rollout`` command line.
"""
