"""Feature networks: the registry, the digits adapter, the FID Inception-v3 port and its weights loading."""

import functools
import hashlib
import math
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from ardistill.evaluation.features import (
    DigitsFeatureNetwork,
    _to_uint8_values,
    FeatureNetwork,
    FunctionFeatures,
    features_and_logits,
    get_feature_network,
    has_logits,
)
from ardistill.evaluation.inception import FIDInceptionV3, WEIGHTS_FILENAME, _check_state_dict, resize_bilinear_tf1

# ---------------------------------------------------------------- references from torch-fidelity 0.4.0
# FeatureExtractorInceptionV3 (torch-fidelity 0.4.0, Apache-2.0) was loaded from its wheel, bypassing
# the package __init__ that needs torchvision. Its state dict (without num_batches_tracked), listed as
# sorted "key:d0,d1,..." lines, hashes to:
REF_KEYS_SHA256 = "f76b93e6d9462d3119d86baf75186bf2bde4fb0f898d1a0cd82ba20302c66803"
REF_NUM_KEYS = 472
REF_NUM_PARAMS = 23_850_960
# Its outputs for fingerprint_images() with deterministic_inception_state() (see below):
REF_POOL_FIRST4 = [[0.2998802065849304, 0.14961972832679749, 0.0, 0.05925958603620529],
                   [0.28155145049095154, 0.14906734228134155, 0.0, 0.060289666056632996]]
REF_POOL_SUM = [1378.3431632491177, 1374.2801582410575]
REF_LOGITS_FIRST4 = [[-1.6598231792449951, -0.14892882108688354, 0.6191542148590088, 0.6119242310523987],
                     [-1.6523473262786865, -0.14943718910217285, 0.6233794093132019, 0.5755303502082825]]
REF_LOGITS_SUM = [-34.500333074480295, -34.96444246545434]


def deterministic_inception_state() -> dict:
    """A weights file's worth of tensors with the FID Inception keys, made without a random generator."""
    return dict(_deterministic_inception_state())


def _meta_inception() -> FIDInceptionV3:
    with torch.device("meta"):  # shapes only, no 24M-parameter init
        return FIDInceptionV3()


@functools.lru_cache(maxsize=1)
def _deterministic_inception_state() -> dict:
    model = _meta_inception()
    shapes = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    # a hash-like sequence, roughly uniform with zero mean and unit variance (no RNG involved);
    # each tensor reads it from its own offset
    n = torch.arange(max(math.prod(v) for v in shapes.values()), dtype=torch.float64)
    base = (torch.frac(torch.abs(torch.sin(n * 12.9898)) * 43758.5453) - 0.5) * math.sqrt(12.0)
    base = torch.cat([base, base])
    state = {}
    for i, (k, shape) in enumerate(sorted(shapes.items())):
        offset = 7919 * i % len(n)
        s = base[offset:offset + math.prod(shape)].reshape(shape)
        if k.endswith("conv.weight"):
            t = s * math.sqrt(2.0 / s[0].numel())  # He scaling keeps activations O(1) through depth
        elif k.endswith("bn.weight"):
            t = 1 + 0.1 * s
        elif k.endswith("running_var"):
            t = 1 + 0.2 * s
        elif k.endswith("fc.weight"):
            t = 0.02 * s
        else:  # bn.bias, running_mean, fc.bias
            t = 0.1 * s
        state[k] = t.float()
    return state


def fingerprint_images() -> torch.Tensor:
    """Two deterministic uint8 RGB images, 16 x 12 (resized to 299 inside)."""
    i = torch.arange(2 * 3 * 16 * 12).reshape(2, 3, 16, 12)
    return ((i * 37 + (i // 12) * 11) % 256).to(torch.uint8)


class TinyClassifier(nn.Module):
    """Random stand-in with DigitsClassifier's interface: features(x) and forward(x) -> logits."""

    def __init__(self, width=16, classes=10):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.GELU())
        self.head = nn.Linear(width, classes)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


# ---------------------------------------------------------------- registry and digits

def test_unknown_network_names_the_choices():
    with pytest.raises(ValueError, match="clip.*digits.*inception"):
        get_feature_network("dinov2")
    with pytest.raises(ValueError, match="needs folder="):  # "clip" is registered (evaluation/clip_score.py)
        get_feature_network("clip")


def test_digits_adapter_features_logits_and_input_formats():
    torch.manual_seed(0)
    clf = TinyClassifier()
    net = get_feature_network("digits", classifier=clf)
    assert isinstance(net, FeatureNetwork) and has_logits(net)
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    f, lg = features_and_logits(net, x)
    assert f.shape == (5, 16) and lg.shape == (5, 10)
    torch.testing.assert_close(f, clf.features(x))
    torch.testing.assert_close(lg, clf(x))
    # uint8 images map to [-1, 1] as v / 127.5 - 1
    u = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    torch.testing.assert_close(net.features(u), clf.features(u.float() / 127.5 - 1))
    assert not any(p.requires_grad for p in net.parameters())


def test_digits_adapter_rejects_wrong_shapes_and_dtypes():
    net = DigitsFeatureNetwork(TinyClassifier())
    with pytest.raises(ValueError, match=r"'digits' expects images \(N, 1, 8, 8\); got \(2, 3, 8, 8\)"):
        net.features(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="dtype"):
        net.features(torch.zeros(2, 1, 8, 8, dtype=torch.int64))


def test_digits_classifier_class_fits_the_adapter():
    classifier = pytest.importorskip("ardistill.evaluation.classifier")
    net = get_feature_network("digits", classifier=classifier.DigitsClassifier())
    f, lg = features_and_logits(net, torch.zeros(4, 1, 8, 8))
    assert f.ndim == 2 and f.shape[0] == 4 and lg.shape == (4, 10)


def test_shipped_digits_classifier_as_feature_network():
    pytest.importorskip("ardistill.evaluation.classifier")
    from ardistill.assets import DIGITS_CLASSIFIER

    if not DIGITS_CLASSIFIER.exists():
        pytest.skip(f"shipped classifier not built yet: {DIGITS_CLASSIFIER}")
    net = get_feature_network("digits")
    f, lg = features_and_logits(net, torch.zeros(4, 1, 8, 8))
    assert f.ndim == 2 and f.shape[0] == 4 and lg.shape == (4, 10)


def test_function_features_and_missing_logits():
    net = FunctionFeatures("flat", lambda x: x.flatten(1))
    assert not has_logits(net)
    x = torch.randn(3, 1, 2, 2)
    f, lg = features_and_logits(net, x, need_logits=False)
    assert f.shape == (3, 4) and lg is None
    with pytest.raises(ValueError, match="'flat' has no logits"):
        features_and_logits(net, x)
    withl = FunctionFeatures("flat", lambda x: x.flatten(1), logits=lambda x: x.flatten(1)[:, :2])
    assert features_and_logits(withl, x)[1].shape == (3, 2)


# ---------------------------------------------------------------- TensorFlow 1.x bilinear resize

def test_resize_bilinear_tf1_hand_cases():
    # upsample 2 -> 4: samples at i * 2/4 = 0, 0.5, 1, 1.5; the upper neighbour clamps at the edge
    x = torch.tensor([[10.0, 30.0]]).reshape(1, 1, 1, 2).expand(1, 1, 2, 2).contiguous()
    out = resize_bilinear_tf1(x, 4)
    assert out.shape == (1, 1, 4, 4)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([10.0, 20.0, 30.0, 30.0]))
    torch.testing.assert_close(out[0, 0, :, 1], torch.full((4,), 20.0))
    # the same along the height
    torch.testing.assert_close(resize_bilinear_tf1(x.transpose(2, 3), 4)[0, 0, :, 0],
                               torch.tensor([10.0, 20.0, 30.0, 30.0]))
    # downsample 4 -> 2 picks pixels 0 and 2 (no averaging, no half-pixel shift)
    y = torch.arange(16.0).reshape(1, 1, 4, 4)
    torch.testing.assert_close(resize_bilinear_tf1(y, 2)[0, 0], torch.tensor([[0.0, 2.0], [8.0, 10.0]]))
    # same size is the identity
    torch.testing.assert_close(resize_bilinear_tf1(y, 4), y)


# ---------------------------------------------------------------- FID Inception-v3 architecture

def test_inception_state_dict_matches_the_fid_weights_layout():
    model = _meta_inception()
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    listing = "\n".join(f"{k}:{','.join(map(str, v.shape))}" for k, v in sorted(state.items()))
    assert len(state) == REF_NUM_KEYS
    assert sum(p.numel() for p in model.parameters()) == REF_NUM_PARAMS  # 23.85M
    assert hashlib.sha256(listing.encode()).hexdigest() == REF_KEYS_SHA256
    # spot checks of well-known shapes
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state["Mixed_6b.branch7x7_2.conv.weight"].shape == (128, 128, 1, 7)
    assert state["Mixed_7c.branch3x3dbl_1.conv.weight"].shape == (448, 2048, 1, 1)
    assert state["fc.weight"].shape == (1008, 2048)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / WEIGHTS_FILENAME
    torch.save(deterministic_inception_state(), path)
    return path


@pytest.fixture(scope="module")
def builtin_net(weights_file):
    return get_feature_network("inception", weights_path=weights_file, backend="builtin")


@pytest.mark.numerics
def test_inception_builtin_forward_matches_torch_fidelity(builtin_net):
    assert builtin_net.backend == "builtin"
    x = fingerprint_images()
    f, lg = features_and_logits(builtin_net, x)
    assert f.shape == (2, 2048) and lg.shape == (2, 1008)
    # torch-fidelity's numbers, from another implementation and machine: rtol 1e-4 is 840 ulps (measured: at
    # most 2.4% of these bounds used, under the AVX-512, AVX2 and default kernels)
    torch.testing.assert_close(f[:, :4], torch.tensor(REF_POOL_FIRST4), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(f.double().sum(1), torch.tensor(REF_POOL_SUM).double(), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(lg[:, :4], torch.tensor(REF_LOGITS_FIRST4), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lg.double().sum(1), torch.tensor(REF_LOGITS_SUM).double(), rtol=1e-4, atol=1e-3)
    # float images in [-1, 1] are quantised to the same uint8 levels first (DiT's rounding)
    assert torch.equal(_to_uint8_values((x.float() - 128.0) / 127.5), x)
    assert torch.equal(_to_uint8_values(torch.tensor([-1.0, -0.999, 0.0, 0.999, 1.0, 2.0])),
                       torch.tensor([0, 0, 128, 255, 255, 255], dtype=torch.uint8))


def test_inception_rejects_non_rgb(builtin_net):
    with pytest.raises(ValueError, match=r"'inception' expects images \(N, 3, H, W\)"):
        builtin_net.features(torch.zeros(1, 1, 8, 8))


def test_inception_missing_weights_names_path_and_source(tmp_path, monkeypatch):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=f"not found: {missing}.*{WEIGHTS_FILENAME}"):
        get_feature_network("inception", weights_path=missing)
    monkeypatch.delenv("ARDISTILL_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match="ARDISTILL_INCEPTION_WEIGHTS"):
        get_feature_network("inception")


def test_inception_weights_from_environment_and_bad_files(tmp_path, monkeypatch, weights_file):
    monkeypatch.setenv("ARDISTILL_INCEPTION_WEIGHTS", str(weights_file))
    assert get_feature_network("inception", backend="builtin").backend == "builtin"
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048), "extra.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match=f"{bad} is not the FID Inception-v3 state dict: missing keys "
                                         r"\['Conv2d_1a_3x3.bn.bias'.*unexpected keys \['extra.weight'\]"):
        get_feature_network("inception", weights_path=bad, backend="builtin")
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=f"cannot read FID Inception weights {bad}"):
        get_feature_network("inception", weights_path=bad, backend="builtin")
    state = deterministic_inception_state()
    state["fc.weight"] = torch.zeros(1000, 2048)
    with pytest.raises(ValueError, match=r"x.pth: 'fc.weight' has shape \(1000, 2048\), expected \(1008, 2048\)"):
        _check_state_dict(_meta_inception(), state, Path("x.pth"))
    with pytest.raises(ValueError, match="backend"):
        get_feature_network("inception", weights_path=weights_file, backend="tf")


def test_torch_fidelity_backend_when_it_is_not_importable(weights_file):
    try:
        import torch_fidelity.feature_extractor_inceptionv3  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torch-fidelity imports here")
    with pytest.raises(ImportError, match="pip install torch-fidelity"):
        get_feature_network("inception", weights_path=weights_file, backend="torch-fidelity")
    assert get_feature_network("inception", weights_path=weights_file).backend == "builtin"


def test_auto_backend_prefers_an_importable_torch_fidelity(weights_file, monkeypatch):
    calls = {}

    class FakeExtractor(nn.Module):
        def __init__(self, name, features_list, feature_extractor_weights_path=None):
            super().__init__()
            calls.update(name=name, features_list=features_list, path=feature_extractor_weights_path)
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x):
            calls["input_dtype"] = x.dtype
            v = x.float().mean(dim=(1, 2, 3))[:, None]
            return v.expand(-1, 2048), v.expand(-1, 1008)

    pkg = types.ModuleType("torch_fidelity")
    pkg.__path__ = []
    mod = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    mod.FeatureExtractorInceptionV3 = FakeExtractor
    monkeypatch.setitem(sys.modules, "torch_fidelity", pkg)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", mod)
    net = get_feature_network("inception", weights_path=weights_file)
    assert net.backend == "torch-fidelity"
    f, lg = features_and_logits(net, torch.ones(2, 3, 4, 4))  # float 1.0 -> uint8 255
    assert calls == {"name": "inception-v3-compat", "features_list": ["2048", "logits_unbiased"],
                     "path": str(weights_file), "input_dtype": torch.uint8}
    assert f.shape == (2, 2048) and lg.shape == (2, 1008) and float(f[0, 0]) == 255.0
