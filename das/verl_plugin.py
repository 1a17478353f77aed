"""DAS's verl plugin, loaded by ``import verl`` in every verl process (``verl.plugins``).

It registers one OmegaConf resolver, ``${das_config_file:NAME}``: the absolute path of a file in
:mod:`das.verl_config`. DAS's verl config names its agent-loop and router files with it, since
verl opens those paths as files (absolute, or relative to the working directory) on whichever
node reads them. The module imports nothing but OmegaConf, so it is safe during ``import verl``.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent / "verl_config"
RESOLVER = "das_config_file"


def das_config_file(name: str) -> str:
    """Absolute path of ``name`` inside :data:`CONFIG_DIR`; ``ValueError`` if it is missing."""
    path = (CONFIG_DIR / name).resolve()
    if CONFIG_DIR not in path.parents or not path.is_file():
        raise ValueError(f"${{{RESOLVER}:{name}}}: no file {name!r} in {CONFIG_DIR}")
    return str(path)


def register() -> None:
    """Register the resolver (idempotent)."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, das_config_file)


register()
