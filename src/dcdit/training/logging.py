"""Metrics sinks for rank 0: metrics.jsonl always, TensorBoard when installed, wandb when asked for."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True, wandb: bool = False,
                 wandb_project: str = "dcdit", run_name: Optional[str] = None, config: Optional[dict] = None,
                 jsonl: str = "metrics.jsonl", prefix: str = "train", note_missing_tensorboard: bool = True,
                 purge_step: Optional[int] = None):
        self.enabled = enabled
        self.tb = self.wandb = None
        self._file = None
        self._pending: list[str] = []  # notes shown with the first info line (after the run has started)
        if not enabled:
            return
        self.prefix = prefix
        self._file = open(Path(run_dir) / jsonl, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: a resumed run hides the events past its checkpoint instead of repeating them
                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"),
                                        **({} if purge_step is None else {"purge_step": purge_step}))
            except Exception as e:  # tensorboard not installed: jsonl only, and say so
                self.tb = None
                if note_missing_tensorboard:
                    self._pending.append(f"train.tensorboard is set but TensorBoard is unavailable ({type(e).__name__}: "
                                         f"{str(e).splitlines()[0] if str(e) else ''}); pip install tensorboard, or "
                                         "set train.tensorboard=false; logging to metrics.jsonl only")
        if wandb:
            try:
                import wandb as _wandb
            except ImportError:
                self.info("train.wandb is set but wandb is not installed (pip install wandb): logging to metrics.jsonl only")
            else:
                self.wandb = _wandb
                _wandb.init(project=wandb_project, name=run_name, config=config, dir=str(run_dir))

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in numeric.items():
                self.tb.add_scalar(f"{self.prefix}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{self.prefix}/{k}": v for k, v in numeric.items()}, step=step)

    def image(self, step: int, tag: str, png_path) -> None:
        """A PNG written elsewhere (e.g. a sample grid) into TensorBoard / wandb as an image."""
        if not self.enabled or (self.tb is None and self.wandb is None):
            return
        import numpy as np
        from PIL import Image

        with Image.open(png_path) as im:
            arr = np.asarray(im.convert("RGB"))
        if self.tb is not None:
            self.tb.add_image(tag, arr, step, dataformats="HWC")
        if self.wandb is not None:
            self.wandb.log({tag: self.wandb.Image(arr)}, step=step)

    def info(self, msg: str) -> None:
        """A human-readable line on stderr (rank 0), kept clear of the progress bar."""
        if not self.enabled:
            return
        if self._pending:
            msg = "\n".join(self._pending + [msg])
            self._pending = []
        try:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stderr)
        except ImportError:
            print(msg, file=sys.stderr)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
