"""Copy a run's final EMA weights into the package as ``pretrained:NAME`` and record what it is.

    python benchmarks/ship_pretrained.py mnist-dit4 runs/lc/dit4_fast/run \\
        --description "DiT/4 (1.3M params), MNIST 32x32" --curve runs/lc/dit4_fast/curve.json

Writes ``src/dcdit/pretrained/NAME/{config.json, ema.safetensors}`` (the EMA
weights only: a few MB; ``--half`` stores them as float16, half the size, and
the loader copies them back into the model's float32 parameters) and the entry of ``src/dcdit/pretrained/index.json``:
the description, what it was trained on and for how long (from the run's
config and log), and its measured scores (from a learning-curve JSON or a
demo summary.json).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    from dcdit.training.state import find_checkpoint
    from dcdit.utils import save_json

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name")
    ap.add_argument("run", help="a run directory (its latest checkpoint is shipped)")
    ap.add_argument("--description", required=True)
    ap.add_argument("--curve", help="learning-curve curve.json: scores of its last point")
    ap.add_argument("--summary", help="demo summary.json: its sample class accuracy and segmentation AUC")
    ap.add_argument("--scores", help="a JSON object of further measured scores, e.g. from an evaluation script")
    ap.add_argument("--half", action="store_true",
                    help="store the weights as float16 (refused if one would overflow it)")
    a = ap.parse_args(argv)
    ckpt = find_checkpoint(Path(a.run))
    if ckpt is None:
        raise SystemExit(f"error: no checkpoint in {a.run}")
    dest = ROOT / "src" / "dcdit" / "pretrained" / a.name
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ckpt / "config.json", dest / "config.json")
    if a.half:
        import torch
        from safetensors.torch import load_file, save_file

        w = load_file(str(ckpt / "ema.safetensors"))
        big = [k for k, v in w.items() if v.is_floating_point() and v.abs().max() > torch.finfo(torch.float16).max]
        if big:
            raise SystemExit(f"error: --half: {big[0]} overflows float16")
        save_file({k: v.half() if v.is_floating_point() else v for k, v in w.items()}, str(dest / "ema.safetensors"))
    else:
        shutil.copyfile(ckpt / "ema.safetensors", dest / "ema.safetensors")
    state = json.loads((ckpt / "train_state.json").read_text())
    import yaml

    tc = yaml.safe_load((ckpt / "train_config.yaml").read_text())
    step, batch = state["step"], tc["train"]["global_batch_size"]
    entry = {"description": a.description,
             "trained": f"{tc['data']['source']} {tc['data']['image_size']}x{tc['data']['image_size']}, "
                        f"{step} steps x {batch} images, lr {tc['optim']['lr']:g}, seed {tc['train']['seed']}, "
                        f"predicts {json.loads((ckpt / 'config.json').read_text()).get('prediction', 'epsilon')}",
             "scores": {}}
    if a.half:
        entry["stored"] = "float16 (EMA weights; loaded into float32)"
    if a.curve:
        p = json.loads(Path(a.curve).read_text())["points"][-1]
        for s in ("cfg1", "cfg3"):
            if s in p:
                g = s[3:]
                entry["scores"][f"class_acc@cfg{g}"] = round(p[s]["class_acc"], 3)
                if "fid" in p[s]:
                    entry["scores"][f"FID{p[s]['n']}@cfg{g}"] = round(p[s]["fid"], 1)
    if a.summary:
        s = json.loads(Path(a.summary).read_text())
        entry["scores"][f"class_acc@cfg{s['cfg_scale']:g}"] = round(s["sample_class_accuracy"], 3)
        entry["scores"]["segmentation_auc@t25"] = round(s["segmentation_auc_late"], 3)
    if a.scores:
        entry["scores"].update(json.loads(a.scores))
    index_path = dest.parent / "index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    index[a.name] = entry
    save_json(index_path, index)
    print(f"shipped {ckpt} as pretrained:{a.name}: {entry}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
