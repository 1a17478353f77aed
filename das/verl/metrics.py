"""DAS's per-step rollout metrics in verl's trainer metrics (and so in the user's logger).

The ``rollout/das_*`` metrics of a step come from DAS's counters on every rollout server
(:func:`das.verl.hook.das_rollout_metrics`). Both of verl 0.9.1's trainers build a step's
metrics inside ``fit()``; each gets them its own way:

* v0 trainer (``trainer.use_v1=false``): DAS's agent-loop manager stores each rollout's metrics
  in the rollout batch's ``meta_info[DAS_METRICS_KEY]``, which verl merges into the training
  batch (``DataProto.union``). :func:`install_trainer_metrics` wraps the one function verl calls
  with the training batch, ``ray_trainer.compute_data_metrics``, to add them to what verl
  computes.
* v1 trainer (``trainer.use_v1=true``, verl's default): rollouts write to TransferQueue and the
  rollout batch carries no ``meta_info``. :func:`install_v1_trainer_metrics` registers, under
  each mode of verl's trainer registry (``trainer.v1.trainer_mode``), a subclass of verl's class
  with :class:`DASTrainerMetrics`. Its ``on_step_end`` reads the counters of every rollout
  server just before verl's own ``on_step_end`` and leaves the step's metrics in
  ``_pending_sync_metrics``, which verl's ``fit()`` merges into the step's logged metrics right
  after ``on_step_end``. DAS's verl plugin installs it when verl imports its v1 trainers
  (:mod:`das.verl.plugin`), so before ``get_trainer_cls`` picks the class. Without DAS's config
  group (no ``das`` key) the subclasses do exactly what verl's classes do.

Which rollouts a v1 step's metrics count: the counters are read at each step's end, just
before verl's ``on_step_end`` (weight update), and a step's metrics are the difference from the
previous read (the previous step's end or, if validation ran since, validation's end; the first
step counts from the engines' start, or from the end of validation before training):

* ``sync``: exactly the step's rollouts. They are submitted in ``step()`` and finished when the
  replay buffer hands over the batch; verl sleeps the replicas at ``on_sample_end`` and wakes
  them in ``on_step_end``, so nothing runs at the read. Validation (after ``on_step_end``) is
  left out.
* ``colocate_async``: generation runs from one step's ``on_step_end`` (weights updated,
  generation resumed) to the next step's ``on_sample_end`` (aborted, asleep), so step t counts
  the rollout work done with the weights of step t-1, partial rollouts included. That is not
  the same set as step t's training batch, which may hold trajectories started in earlier steps
  (verl's ``training/off_policy/*`` metrics say how stale). Rollout work that runs while
  validation does (with validation's own rollouts) is left out.
* ``separate_async``: the standalone replicas never stop, so step t counts all rollout work on
  every replica (standalone and hybrid) between two reads, except what runs during validation.

The v0 wrap and the v1 registration are each installed once per process, only on verl 0.9.1,
and logged.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from das.verl.hook import (
    check_verl_version,
    das_configured,
    das_rollout_metrics_by_server,
    das_stats_by_server,
)

logger = logging.getLogger(__name__)

DAS_METRICS_KEY = "das_rollout_metrics"
_MARK = "__das_metrics__"

Counters = dict[str, list[dict[str, Any] | None]]  # server id -> per-worker das_stats


def das_metrics_of(batch: Any) -> dict[str, float]:
    """The ``rollout/das_*`` metrics a verl ``DataProto`` carries (empty without DAS)."""
    return dict((getattr(batch, "meta_info", None) or {}).get(DAS_METRICS_KEY) or {})


def with_das_metrics(compute_data_metrics: Callable[..., dict[str, Any]]) -> Callable:
    """``compute_data_metrics`` that also returns the batch's DAS metrics."""

    @functools.wraps(compute_data_metrics)
    def wrapped(*args: Any, **kwargs: Any) -> dict[str, Any]:
        metrics = compute_data_metrics(*args, **kwargs)
        batch = kwargs["batch"] if "batch" in kwargs else args[0]
        return {**metrics, **das_metrics_of(batch)}

    setattr(wrapped, _MARK, True)
    return wrapped


def install_trainer_metrics() -> bool:
    """Wrap verl's ``ray_trainer.compute_data_metrics`` (once); False if already wrapped."""
    from verl.trainer.ppo import ray_trainer

    check_verl_version()
    if getattr(ray_trainer.compute_data_metrics, _MARK, False):
        return False
    ray_trainer.compute_data_metrics = with_das_metrics(ray_trainer.compute_data_metrics)
    logger.info("verl trainer metrics now include DAS's rollout/das_* metrics")
    return True


class DASTrainerMetrics:
    """Mixin for verl 0.9.1's v1 ``PPOTrainer`` classes: each step's ``rollout/das_*`` metrics.

    Does nothing unless the trainer's config has DAS's ``das`` group. With it, the rollout
    replicas serve DAS's counters (:func:`das.verl.server.register_replica`, before verl starts
    them in ``init()``), and every step's metrics join verl's own pending metrics.
    """

    _das_counters: Counters | None = None  # the last read; None: the engines' start
    _das_warned = False

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        if das_configured(config):
            from das.verl.server import register_replica

            register_replica()
        super().__init__(config, *args, **kwargs)

    def on_step_end(self) -> None:
        """verl's ``on_step_end``, plus the step's DAS metrics in ``_pending_sync_metrics``."""
        if not das_configured(self.config):
            super().on_step_end()
            return
        counters = self._read_das_counters()  # before verl's weight update resumes generation
        super().on_step_end()
        if counters is None:
            return
        pending = dict(getattr(self, "_pending_sync_metrics", None) or {})  # verl's, if any
        pending.update(das_rollout_metrics_by_server(self._das_counters or {}, counters))
        self._pending_sync_metrics = pending
        self._das_counters = counters

    def on_validate_end(self) -> None:
        """verl's ``on_validate_end``; the next step counts from here (validation left out)."""
        super().on_validate_end()
        if das_configured(self.config):
            self._das_counters = self._read_das_counters() or self._das_counters

    def _read_das_counters(self) -> Counters | None:
        """DAS's counters of every rollout server verl knows (None, with a warning, on error)."""
        from verl.utils.ray_utils import auto_await

        servers = {
            address: handle
            for manager in self._rollout_server_managers()
            for address, handle in zip(
                manager.server_addresses, manager.server_handles, strict=True
            )
        }
        try:
            return auto_await(das_stats_by_server)(servers)
        except Exception as error:  # e.g. replicas started without DAS's server
            if not DASTrainerMetrics._das_warned:
                DASTrainerMetrics._das_warned = True
                logger.warning("rollout/das_* metrics not logged: DAS stats unreadable: %r", error)
            return None


def install_v1_trainer_metrics() -> list[str]:
    """Register a :class:`DASTrainerMetrics` subclass for each mode of verl's v1 trainer registry.

    Idempotent: a mode whose class already has it is left alone. Returns the modes changed now.
    """
    from verl.trainer.ppo.v1 import trainer_base

    check_verl_version()
    changed = []
    for mode, trainer_cls in list(trainer_base.TRAINER_REGISTRY.items()):
        if getattr(trainer_cls, _MARK, False):
            continue
        name = f"DAS{trainer_cls.__name__}"
        namespace = {_MARK: True, "__module__": __name__, "__qualname__": name}
        subclass = type(trainer_cls)(name, (DASTrainerMetrics, trainer_cls), namespace)
        subclass.__doc__ = f"verl's {trainer_cls.__name__} with DAS's rollout/das_* metrics."
        trainer_base.TRAINER_REGISTRY[mode] = subclass
        changed.append(mode)
    if changed:
        logger.info(
            "verl v1 trainer modes %s log DAS's rollout/das_* metrics when DAS is configured",
            ", ".join(changed),
        )
    return changed
