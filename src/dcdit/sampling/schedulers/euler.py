"""``euler``: the Euler ODE step of Karras et al. 2022, diffusers' ``EulerDiscreteScheduler``.

First order in the sigma parameterisation (x / sqrt(abar), sigma =
sqrt((1 - abar) / abar)); deterministic (no churn). Simple and robust; needs
more steps than the second-order solvers.
"""
from dcdit.sampling.schedulers.base import SchedulerAdapter

ADAPTER = SchedulerAdapter(
    name="euler",
    class_name="EulerDiscreteScheduler",
    options=dict(interpolation_type="linear", final_sigmas_type="zero"),
    description="Euler (diffusers EulerDiscreteScheduler), deterministic, first order",
)
