"""The OmegaConf resolvers that DAS's verl configs use, and where those configs live.

* ``${das_config_file:NAME}``: the absolute path of a file in :mod:`das.verl.config`. DAS's verl
  config names its agent-loop and router files with it, since verl opens those paths as files
  (absolute, or relative to the working directory) on whichever node reads them.
* ``${das_agent_loop_manager:USE_V1}``: DAS's agent-loop manager (per-step ``rollout/das_*``
  metrics) for verl's v0 trainer (``trainer.use_v1=false``), and None, verl's own manager, for
  the v1 trainer, whose manager must write to TransferQueue.

Imports nothing but OmegaConf and the standard library, and nothing of DAS's: both the verl
plugin (loaded during ``import verl``) and :mod:`das.verl.hook` depend on it.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent / "config"
RESOLVER = "das_config_file"
MANAGER_RESOLVER = "das_agent_loop_manager"
DAS_AGENT_LOOP_MANAGER = "das.verl.manager.DASAgentLoopManager"


def das_config_file(name: str) -> str:
    """Absolute path of ``name`` inside :data:`CONFIG_DIR`; ``ValueError`` if it is missing."""
    path = (CONFIG_DIR / name).resolve()
    if CONFIG_DIR not in path.parents or not path.is_file():
        raise ValueError(f"${{{RESOLVER}:{name}}}: no file {name!r} in {CONFIG_DIR}")
    return str(path)


def das_agent_loop_manager(use_v1: bool) -> str | None:
    """DAS's agent-loop manager class path for verl's v0 trainer; None for the v1 trainer."""
    return None if use_v1 else DAS_AGENT_LOOP_MANAGER


def register_resolvers() -> None:
    """Register both resolvers with OmegaConf (idempotent)."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, das_config_file)
    if not OmegaConf.has_resolver(MANAGER_RESOLVER):
        OmegaConf.register_new_resolver(MANAGER_RESOLVER, das_agent_loop_manager)
