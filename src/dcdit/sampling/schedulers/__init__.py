"""diffusers' fast ODE solvers behind the library's sampling loop, one small adapter module per scheduler.

``SCHEDULERS`` maps a sampler name to its :class:`SchedulerAdapter`;
:func:`scheduler_sampling` builds the :class:`SchedulerSampling` that
:func:`dcdit.sampling.sample` runs. diffusers is an optional dependency,
imported only when a scheduler is built (``pip install dcdit[samplers]``).
"""
from dcdit.sampling.schedulers import dpm_solver, euler, unipc
from dcdit.sampling.schedulers.base import (
    DIFFUSERS_VERSION,
    PREDICTION_TYPES,
    SchedulerAdapter,
    SchedulerSampling,
    import_diffusers,
)

__all__ = ["SCHEDULERS", "SchedulerAdapter", "SchedulerSampling", "scheduler_sampling", "import_diffusers",
           "PREDICTION_TYPES", "DIFFUSERS_VERSION"]

SCHEDULERS: dict[str, SchedulerAdapter] = {a.name: a for a in (dpm_solver.ADAPTER, unipc.ADAPTER, euler.ADAPTER)}


def scheduler_sampling(name: str, steps: int, betas, prediction: str = "epsilon",
                       learn_sigma: bool = True) -> SchedulerSampling:
    """The :class:`SchedulerSampling` of the named solver for ``steps`` steps on ``betas``."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown diffusers sampler {name!r}: expected one of {', '.join(SCHEDULERS)}")
    return SchedulerSampling(SCHEDULERS[name], steps, betas, prediction, learn_sigma)
