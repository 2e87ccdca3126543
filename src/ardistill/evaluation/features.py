"""Feature networks for the metrics: a registry of adapters with one interface.

A feature network maps images to feature vectors (for Fréchet distance and precision/recall) and,
when it is a classifier, to class logits (for the Inception Score). Every network here takes
images as (N, C, H, W) tensors, either float in [-1, 1] (the models' output range) or uint8 in
[0, 255] (decoded files, ADM batches: permute NHWC to NCHW first):

  "digits"     the shipped 8x8 digits classifier (ardistill.evaluation.classifier): (N, 1, 8, 8);
               features = its penultimate layer, logits = its 10 class logits.
  "photos"     the shipped photos classifier (same network, trained on the 16x16 RGB photo crops):
               (N, 3, 16, 16); features = its penultimate layer, logits = its 10 class logits.
  "inception"  the FID Inception-v3 (2015 TensorFlow graph) from a local weights file: (N, 3, H, W),
               any size; features = pool_3 (2048), logits = 1008 unbiased logits. Float images are
               quantised to uint8 first (DiT's rounding), as when samples are saved for ADM.

Networks are imported and built only when asked for, so metrics never pull in what they don't use.
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch
import torch.nn as nn


@runtime_checkable
class FeatureNetwork(Protocol):
    """images (N, C, H, W) -> features (N, F) float; classifiers also have ``logits`` -> (N, K)."""

    name: str

    def features(self, images: torch.Tensor) -> torch.Tensor: ...


def has_logits(net: FeatureNetwork) -> bool:
    return callable(getattr(net, "logits", None))


def features_and_logits(net: FeatureNetwork, images: torch.Tensor,
                        need_logits: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Features and (when asked and available) logits, in one forward pass where the network allows."""
    if need_logits and not has_logits(net):
        raise ValueError(f"feature network '{net.name}' has no logits: the Inception Score needs a classifier")
    if not need_logits:
        return net.features(images), None
    both = getattr(net, "features_and_logits", None)
    if callable(both):
        return both(images)
    return net.features(images), net.logits(images)


def _to_pm1(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]; float images pass through."""
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1.0
    if not images.is_floating_point():
        raise ValueError(f"images must be float in [-1, 1] or uint8; got dtype {images.dtype}")
    return images


def _to_uint8_values(images: torch.Tensor) -> torch.Tensor:
    """Float [-1, 1] -> uint8 levels clamp(127.5 x + 128) truncated (DiT's sample_ddp.py); uint8 passes."""
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise ValueError(f"images must be float in [-1, 1] or uint8; got dtype {images.dtype}")
    return torch.clamp(127.5 * images + 128.0, 0, 255).to(torch.uint8)


def _module_device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _check_shape(name: str, images: torch.Tensor, channels: int, size: int | None = None) -> None:
    ok = images.ndim == 4 and images.shape[1] == channels
    if size is not None:
        ok = ok and tuple(images.shape[2:]) == (size, size)
    if not ok:
        want = f"(N, {channels}, {size}, {size})" if size else f"(N, {channels}, H, W)"
        raise ValueError(f"feature network '{name}' expects images {want}; got {tuple(images.shape)}")


class FunctionFeatures:
    """Wrap plain functions as a feature network (any feature function works with the metrics)."""

    def __init__(self, name: str, features: Callable[[torch.Tensor], torch.Tensor],
                 logits: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.name = name
        self._features = features
        if logits is not None:
            self.logits = logits

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self._features(images)


class DigitsFeatureNetwork(nn.Module):
    """The digits classifier as a feature network: penultimate features and 10-class logits."""

    name = "digits"
    image_size = 8

    def __init__(self, classifier: nn.Module, name: str = "digits"):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.name = name
        cfg = getattr(classifier, "cfg", None)
        self.channels = cfg.in_channels if cfg is not None else 1
        self.image_size = cfg.input_size if cfg is not None else 8

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        _check_shape(self.name, images, self.channels, self.image_size)
        return _to_pm1(images.to(_module_device(self)))

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(self._prepare(images)).float()

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self._prepare(images)).float()


class InceptionFeatureNetwork(nn.Module):
    """FID Inception-v3: pool_3 features (2048) and unbiased logits (1008) of RGB images."""

    name = "inception"

    def __init__(self, model: nn.Module, backend: str):
        super().__init__()
        self.model = model
        self.backend = backend  # "torch-fidelity" or "builtin"

    @torch.no_grad()
    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_shape(self.name, images, 3)
        x = _to_uint8_values(images.to(_module_device(self)))
        # torch-fidelity's extractor takes uint8; the builtin port takes the same levels as floats.
        pool, logits = self.model(x) if self.backend == "torch-fidelity" else self.model(x.float())
        return pool.float(), logits.float()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[0]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[1]


# ----------------------------------------------------------------------------- registry

def _digits(path=None, classifier: nn.Module | None = None, device=None) -> DigitsFeatureNetwork:
    if classifier is None:
        from ardistill.evaluation.classifier import load_digits_classifier

        classifier = load_digits_classifier(path)
    return DigitsFeatureNetwork(classifier).to(device)


def _photos(path=None, classifier: nn.Module | None = None, device=None) -> DigitsFeatureNetwork:
    if classifier is None:
        from ardistill.evaluation.classifier import load_photos_classifier

        classifier = load_photos_classifier(path)
    return DigitsFeatureNetwork(classifier, name="photos").to(device)


def _classifier(path=None, classifier: nn.Module | None = None, device=None) -> DigitsFeatureNetwork:
    """A classifier trained by ``ardistill train-classifier`` on your own data (``path`` required)."""
    if classifier is None:
        if path is None:
            raise ValueError("feature network 'classifier': give the path of a train-classifier file")
        from ardistill.evaluation.classifier import load_digits_classifier

        classifier = load_digits_classifier(path)
    return DigitsFeatureNetwork(classifier, name="classifier").to(device)


def _inception(weights_path=None, backend: str = "auto", device=None) -> InceptionFeatureNetwork:
    from ardistill.evaluation.inception import load_fid_inception, resolve_weights_path

    if backend not in ("auto", "torch-fidelity", "builtin"):
        raise ValueError(f"inception backend must be 'auto', 'torch-fidelity' or 'builtin'; got {backend!r}")
    path = resolve_weights_path(weights_path)
    if backend in ("auto", "torch-fidelity"):
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as e:
            if backend == "torch-fidelity":
                raise ImportError("the 'torch-fidelity' inception backend needs `pip install torch-fidelity` "
                                  f"(which needs a torchvision that imports with this torch): {e}") from e
        else:
            model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                feature_extractor_weights_path=str(path))
            return InceptionFeatureNetwork(model, "torch-fidelity").to(device)
    return InceptionFeatureNetwork(load_fid_inception(path), "builtin").to(device)


def _clip(folder=None, device=None):
    from ardistill.evaluation.clip_score import CLIPScorer

    if folder is None:
        raise ValueError("the 'clip' feature network needs folder= (a local transformers CLIP folder)")
    return CLIPScorer(folder, device=device)


FEATURE_NETWORKS: dict[str, Callable[..., FeatureNetwork]] = {
    "digits": _digits,
    "photos": _photos,
    "classifier": _classifier,  # a train-classifier file of your own data (path=...)
    "inception": _inception,
    "clip": _clip,  # projected CLIP image embeddings (evaluation/clip_score.py): FD in CLIP space
}


def get_feature_network(name: str, **kwargs) -> FeatureNetwork:
    """Build a registered feature network.

    Args:
        name: "digits" or "photos" (kwargs: path=None for the shipped classifier, classifier=a module, device)
            or "inception" (kwargs: weights_path=None -> $ARDISTILL_INCEPTION_WEIGHTS,
            backend="auto" | "torch-fidelity" | "builtin", device) or "clip" (kwargs: folder, device).
    """
    if name not in FEATURE_NETWORKS:
        raise ValueError(f"unknown feature network {name!r}; choose from {sorted(FEATURE_NETWORKS)}")
    return FEATURE_NETWORKS[name](**kwargs)
