"""``unipc``: UniPC (bh2, order 2), diffusers' ``UniPCMultistepScheduler``.

Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast
Sampling of Diffusion Models": a multistep predictor with a corrector that
reuses the next step's network output, so it costs one call per step like
DPM-Solver++; often a little better at 5-10 steps.
"""
from dcdit.sampling.schedulers.base import SchedulerAdapter

ADAPTER = SchedulerAdapter(
    name="unipc",
    class_name="UniPCMultistepScheduler",
    options=dict(solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True,
                 final_sigmas_type="zero", thresholding=False),
    description="UniPC bh2 order 2 (diffusers UniPCMultistepScheduler), deterministic, 5-20 steps",
)
