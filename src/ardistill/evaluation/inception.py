"""The FID Inception-v3 network in plain torch.nn, loading the standard pt_inception-2015-12-05 weights.

This is the network behind FID: the 2015 TensorFlow Inception graph (classify_image_graph_def.pb) that
the TTUR and ADM evaluators run, as ported to PyTorch by pytorch-fid and torch-fidelity. Parameter
names follow those ports, so their converted weights file loads as is:
``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid) = ``weights-inception-2015-12-05-6726825d.pth``
(torch-fidelity). torch-fidelity's own extractor is preferred when it imports (see features.py);
both packages require torchvision, which is why this port exists.

Differences from torchvision's Inception3, all to match the TensorFlow graph:
- input: RGB in [0, 255], resized to 299 x 299 with TensorFlow 1.x bilinear resampling
  (align_corners = False, no half-pixel offset), then (x - 128) / 128;
- average pools in the A, C and first E blocks exclude the zero padding (TensorFlow's rule);
- the last E block pools its fourth branch with a max pool (a quirk of the 2015 graph);
- 1008 classes; Inception Score uses the logits without the bias (as the graph's softmax/logits).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

INPUT_SIZE = 299
NUM_CLASSES = 1008
POOL_DIM = 2048
WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_HELP = (
    f"Get the FID Inception weights file {WEIGHTS_FILENAME} (pytorch-fid's release 'fid_weights', "
    "or torch-fidelity's weights-inception-2015-12-05-6726825d.pth: the same file) on a machine with "
    "network access, then pass its path (--inception-weights PATH, or the ARDISTILL_INCEPTION_WEIGHTS "
    "environment variable).")


def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1.x ResizeBilinear (align_corners = False, half_pixel_centers = False) of (N, C, H, W).

    Output pixel i samples the input at i * in / out (no half-pixel shift), linearly between the two
    neighbouring pixels, the upper index clamped to the edge; F.interpolate has no such mode.
    """
    def axis(n_in: int):
        src = torch.arange(size, dtype=torch.float32, device=x.device) * (n_in / size)
        lo = src.floor().long()
        hi = (lo + 1).clamp_max(n_in - 1)
        return lo, hi, (src - lo.float()).to(x.dtype)

    ylo, yhi, dy = axis(x.shape[2])
    xlo, xhi, dx = axis(x.shape[3])
    rows_lo, rows_hi = x[:, :, ylo], x[:, :, yhi]  # (N, C, size, W)
    top = rows_lo[..., xlo] + (rows_lo[..., xhi] - rows_lo[..., xlo]) * dx
    bottom = rows_hi[..., xlo] + (rows_hi[..., xhi] - rows_hi[..., xlo]) * dx
    return top + (bottom - top) * dy[:, None]


class BasicConv2d(nn.Module):
    """Conv (no bias) -> batch norm (eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x):
    # TensorFlow's SAME average pool divides by the number of real (unpadded) inputs.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35 x 35 block (Mixed_5b..5d): 1x1 | 5x5 | double 3x3 | pool -> 64 + 64 + 96 + pool_features."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_tf_avg_pool(x)),
        ], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a): strided 3x3 | double 3x3 | max pool."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    """17 x 17 block (Mixed_6b..6e) with factorised 7x7 convolutions of width c7."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        dbl = x
        for i in range(1, 6):
            dbl = getattr(self, f"branch7x7dbl_{i}")(dbl)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(_tf_avg_pool(x)),
        ], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a): 3x3 | 7x7 then 3x3 | max pool."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([
            self.branch3x3_2(self.branch3x3_1(x)),
            b7,
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], 1)


class InceptionE(nn.Module):
    """8 x 8 block (Mixed_7b, 7c) with split 1x3 / 3x1 convolutions; ``pool`` = "avg" or "max"."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max'; got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
            self.branch_pool(pooled),
        ], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 as in the 2015 TensorFlow graph: images -> pool_3 features (2048) and logits (1008)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(POOL_DIM, NUM_CLASSES)

    def pool_features(self, images: torch.Tensor) -> torch.Tensor:
        """RGB (N, 3, H, W) float in [0, 255], any size -> pool_3 features (N, 2048)."""
        x = resize_bilinear_tf1(images, INPUT_SIZE)
        x = (x - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 192, 35, 35)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)  # ends at (N, 2048, 8, 8)
        return x.mean(dim=(2, 3))

    def unbiased_logits(self, pool: torch.Tensor) -> torch.Tensor:
        """Class logits without the fc bias, as the graph's softmax/logits/MatMul (IS uses these)."""
        return pool @ self.fc.weight.T

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool = self.pool_features(images)
        return pool, self.unbiased_logits(pool)


def resolve_weights_path(path: str | Path | None) -> Path:
    """The weights path given, else $ARDISTILL_INCEPTION_WEIGHTS; an error that says how to get it if absent."""
    import os

    if path is None:
        path = os.environ.get("ARDISTILL_INCEPTION_WEIGHTS")
        if not path:
            raise FileNotFoundError(f"no FID Inception weights file was given. {WEIGHTS_HELP}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"FID Inception weights file not found: {path}. {WEIGHTS_HELP}")
    return path


def load_fid_inception(path: str | Path | None = None, device=None) -> FIDInceptionV3:
    """Build FIDInceptionV3 and load the converted TensorFlow weights (.pth or .safetensors), in eval mode."""
    path = resolve_weights_path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a corrupt or non-tensor file: say which
            raise ValueError(f"cannot read FID Inception weights {path}: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (the FID Inception weights)")
    with torch.device("meta"):  # skip the random init of 24M parameters that are overwritten anyway
        model = FIDInceptionV3()
    _check_state_dict(model, state, path)
    model.to_empty(device="cpu")
    model.load_state_dict(state, strict=False)  # strictness checked above, bar num_batches_tracked
    for name, buf in model.named_buffers():
        if name.endswith("num_batches_tracked"):
            buf.zero_()
    return model.to(device).eval().requires_grad_(False)


def _check_state_dict(model: nn.Module, state: dict, path: Path) -> None:
    # The converted TF weights carry no BatchNorm num_batches_tracked counters: not required.
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    given = {k: v.shape for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} is not the FID Inception-v3 state dict: missing keys {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
    for k, shape in expected.items():
        if given[k] != shape:
            raise ValueError(f"{path}: '{k}' has shape {tuple(given[k])}, expected {tuple(shape)}")
