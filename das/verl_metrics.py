"""DAS's per-step rollout metrics in verl's trainer metrics (and so in the user's logger).

DAS's agent-loop manager stores each step's ``rollout/das_*`` metrics in the rollout batch's
``meta_info[DAS_METRICS_KEY]``; verl's trainer merges that ``meta_info`` into the training
batch (``DataProto.union``). verl 0.9.1's trainer builds its metrics dict inside ``fit()`` with
no extension point, so :func:`install_trainer_metrics` wraps the one function it calls with the
training batch, ``ray_trainer.compute_data_metrics``, to add the batch's DAS metrics to what
verl computes. The wrap is installed once per process, only on verl 0.9.1, and logged.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

DAS_METRICS_KEY = "das_rollout_metrics"
_MARK = "__das_metrics__"


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

    from das.verl_hook import check_verl_version

    check_verl_version()
    if getattr(ray_trainer.compute_data_metrics, _MARK, False):
        return False
    ray_trainer.compute_data_metrics = with_das_metrics(ray_trainer.compute_data_metrics)
    logger.info("verl trainer metrics now include DAS's rollout/das_* metrics")
    return True
