"""``dpm++2m``: DPM-Solver++ (2M), diffusers' ``DPMSolverMultistepScheduler``.

Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models": a second-order multistep solver of the diffusion ODE in
the data (x0) parameterisation, one network call per step; the first step and
the last (to sigma = 0) are first order. Robust under guidance; the usual
choice for 10-20 steps.
"""
from dcdit.sampling.schedulers.base import SchedulerAdapter

ADAPTER = SchedulerAdapter(
    name="dpm++2m",
    class_name="DPMSolverMultistepScheduler",
    options=dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
                 final_sigmas_type="zero", thresholding=False),
    description="DPM-Solver++ 2M (diffusers DPMSolverMultistepScheduler), deterministic, 10-20 steps",
)
