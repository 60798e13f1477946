"""The CPU-scale reproduction of the DC-DiT paper's claims, as a package of thin modules over dcdit.

Run it with ``python benchmarks/reproduce.py`` (usage: :mod:`reproduction.run`). The sibling benchmarks
(adaptive.py, canvas.py, learning_curve.py, fid_diagnosis.py) reuse its protocol through this package;
run as ``python benchmarks/NAME.py``, their folder is first on ``sys.path``, so ``import reproduction``
finds it.

* :mod:`.settings` - the sizes (:class:`Settings`, full run vs ``--smoke``) and the training configs
* :mod:`.runs` - stage JSON cache, data, training runs and checkpoints
* :mod:`.scoring` - samples -> FID, class accuracy, GFLOPs, kept shares; sampling speed
* :mod:`.stages` - classifier, reference, train, eval, upcycle, speed, elastic, shapes, curve
* :mod:`.report` - results.json, table.md and the plots
* :mod:`.run` - the command line
"""
from .report import canvas_claims, render, scaffold_share, stage_report
from .run import main
from .runs import cached, dataset, dataset_uint8, load, log, mnist, read_json, run_step, train_run, write_json
from .scoring import Ctx, sampling_speed, score
from .settings import CANVAS_MODELS, MODELS, SAMPLE_PRECISION, SHAPES_VARIANTS, Settings, smoke_settings, train_dict
from .stages import stage_classifier, stage_reference

__all__ = [
    "CANVAS_MODELS", "Ctx", "MODELS", "canvas_claims", "SAMPLE_PRECISION", "SHAPES_VARIANTS", "Settings", "cached", "dataset", "dataset_uint8", "load",
    "log", "main", "mnist", "read_json", "render", "run_step", "sampling_speed", "scaffold_share", "score",
    "smoke_settings", "stage_classifier", "stage_reference", "stage_report", "train_dict", "train_run",
    "write_json",
]
