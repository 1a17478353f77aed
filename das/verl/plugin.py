"""DAS's verl plugin, loaded by ``import verl`` in every verl process (``verl.plugins``).

It registers the OmegaConf resolvers of DAS's verl configs (:mod:`das.verl.resolvers`) and one
import hook: when a process imports verl's v1 trainers (``verl.trainer.ppo.v1``, which
verl's ``TaskRunnerV1`` actor does just before ``get_trainer_cls(trainer.v1.trainer_mode)``),
:func:`das.verl.metrics.install_v1_trainer_metrics` registers DAS's subclasses of them, which
log DAS's metrics when the config has DAS's ``das`` group. The hook imports nothing until verl
imports that package (it imports TransferQueue, so only processes that need it pay for it), and
on another verl version it logs a warning and leaves verl's trainers alone.

The module imports nothing but OmegaConf and the standard library at import time, so it is safe
during ``import verl``.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys
from types import ModuleType
from typing import Any

from das.verl.resolvers import register_resolvers

logger = logging.getLogger(__name__)

V1_TRAINERS = "verl.trainer.ppo.v1"  # verl's v1 trainer package: all modes registered on import


def _install_v1_trainer_metrics() -> None:
    """DAS's v1 trainer subclasses (:mod:`das.verl.metrics`); a warning instead of an error."""
    try:
        from das.verl.metrics import install_v1_trainer_metrics as install

        install()
    except Exception as error:  # never break verl's own import: its trainers stay as they are
        logger.warning("DAS's metrics are not added to verl's v1 trainers: %s", error)


class _InstallAfterExec(importlib.abc.Loader):
    """verl's loader of :data:`V1_TRAINERS`, then :func:`_install_v1_trainer_metrics`."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _install_v1_trainer_metrics()

    def __getattr__(self, name: str) -> Any:  # is_package, get_resource_reader, ...
        return getattr(self._loader, name)


class V1TrainerImportHook(importlib.abc.MetaPathFinder):
    """Finds :data:`V1_TRAINERS` as the rest of ``sys.meta_path`` would, loading it with
    :class:`_InstallAfterExec`; every other import passes through untouched."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != V1_TRAINERS:
            return None
        finders = sys.meta_path[sys.meta_path.index(self) + 1 :] if self in sys.meta_path else []
        for finder in finders:
            spec = getattr(finder, "find_spec", lambda *_: None)(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _InstallAfterExec(spec.loader)
                return spec
        return None


def register() -> None:
    """Register the resolvers and the v1 trainer import hook (idempotent)."""
    register_resolvers()
    if V1_TRAINERS in sys.modules:  # verl imported its v1 trainers before this plugin ran
        _install_v1_trainer_metrics()
    elif not any(isinstance(finder, V1TrainerImportHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, V1TrainerImportHook())


register()
