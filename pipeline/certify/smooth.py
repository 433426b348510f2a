"""Randomized smoothing of one image, as Cohen et al. wrote it: `Smooth.certify(x, n0, n,
alpha)` and `predict(x, n, alpha)`, on the batched vote counter (`pipeline.sampling.engine`)
and the one CERTIFY / PREDICT of `pipeline.stats.smoothing`.

The same two draws (selection, estimation) at the same noise addresses as a `dsmooth
certify` run (`pipeline.certify.run`): one image here, a data set there.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
from torch import nn

from pipeline.sampling.engine import VoteCounter
from pipeline.sampling.noise import DEFAULT_CHUNK_SIZE, SampleRequest
from pipeline.stats import smoothing


class SmoothedClassifier:
    """g(x) = argmax_c P[f(x + delta) = c]: Cohen et al.'s `Smooth`, on the batched engine.

    `seed` and `chunk_size` fix the noise addresses of its draws (selection and estimation
    noise are independent: their phases are part of the address).
    """

    def __init__(self, counter: VoteCounter, *, seed: int = 0, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self.counter = counter
        self.seed = seed
        self.chunk_size = chunk_size

    def _request(self, image_id: int, phase: str, n: int) -> SampleRequest:
        return SampleRequest(self.seed, image_id, phase, n, self.chunk_size)

    def certify(self, image_id: int, image: torch.Tensor, n0: int, n: int, alpha: float) -> tuple[Hashable, float]:
        """(class, radius) or (ABSTAIN, 0.0); the radius is in the noise's norm (l2 Gaussian, l1
        uniform / Laplace)."""
        if n0 > n:
            raise ValueError(f"n0={n0} must not exceed n={n}")
        selection, estimation = self.counter.count(
            {image_id: image}, [self._request(image_id, "selection", n0), self._request(image_id, "estimation", n)]
        )
        decision = smoothing.certify_matrix(selection, estimation, self.counter.sigma, alpha,
                                            noise=self.counter.noise)
        return int(decision.prediction[0]), float(decision.radius[0])

    def predict(self, image_id: int, image: torch.Tensor, n: int, alpha: float) -> Hashable:
        (counts,) = self.counter.count({image_id: image}, [self._request(image_id, "prediction", n)])
        return int(smoothing.predict_matrix(counts, alpha).prediction[0])


class Smooth:
    """Cohen et al.'s `Smooth` interface -- `certify(x, n0, n, alpha)`, `predict(x, n, alpha)`
    -- over `SmoothedClassifier`, so code written for the reference implementation runs on
    the batched engine and the one CERTIFY / PREDICT of `pipeline.stats.smoothing`.

    Cohen's calls take no image id; here the k-th call (from 0) draws the noise of image
    address k, so every call gets fresh noise and a new `Smooth` with the same `seed` repeats
    the same answers. Pass `image_id=` to pin the address instead (a data set's image id and
    chunk_size 256 reproduce the counts of a `dsmooth certify` run with the same seed).
    `sound=True` draws floating-point-sound noise (`pipeline.sampling.sound`; 8-bit images only).
    """

    ABSTAIN = smoothing.ABSTAIN

    def __init__(
        self,
        base_classifier: nn.Module,
        num_classes: int,
        sigma: float,
        batch_size: int = 400,
        seed: int = 0,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        device: torch.device | str | None = None,
        amp: bool | str = False,
        precision: str = "fp32",
        sound: bool = False,
        noise: str = "gaussian",
    ) -> None:
        counter = VoteCounter(base_classifier, num_classes, sigma, batch_size=batch_size, device=device, amp=amp,
                              precision=precision, sound=sound, noise=noise)
        self.smoothed = SmoothedClassifier(counter, seed=seed, chunk_size=chunk_size)
        self.base_classifier = counter.model
        self.num_classes = num_classes
        self.sigma = counter.sigma
        self.noise = counter.noise  # gaussian (l2 radii), uniform or laplace (l1 radii): pipeline.sampling.noise
        self._calls = 0

    @property
    def counter(self) -> VoteCounter:
        return self.smoothed.counter

    def _address(self, image_id: int | None) -> int:
        if image_id is not None:
            return int(image_id)
        address, self._calls = self._calls, self._calls + 1
        return address

    @staticmethod
    def _image(x: torch.Tensor) -> torch.Tensor:
        """[C, H, W] as Cohen's; a batch of one ([1, C, H, W]) is accepted too."""
        x = torch.as_tensor(x)
        if x.dim() == 4 and x.shape[0] == 1:
            x = x[0]
        if x.dim() != 3:
            raise ValueError(f"x must be one image [C, H, W], got shape {tuple(x.shape)}")
        return x

    def _batch(self, batch_size: int | None) -> None:
        """Cohen's calls pass batch_size; it changes speed and memory, never a count."""
        if batch_size is not None and batch_size != self.counter.batch_size:
            old = self.counter
            self.smoothed.counter = VoteCounter(old.model, old.num_classes, old.sigma, batch_size=batch_size,
                                                device=old.device, precision=old.precision,
                                                sound=old.sound, noise=old.noise)
            self.smoothed.counter.amp_dtype = old.amp_dtype

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int | None = None, *,
                image_id: int | None = None) -> tuple[int, float]:
        """(predicted class, certified radius), or (ABSTAIN, 0.0): an l2 radius under Gaussian
        noise, l1 under uniform or Laplace noise (`noise=`)."""
        self._batch(batch_size)
        return self.smoothed.certify(self._address(image_id), self._image(x), n0, n, alpha)

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int | None = None, *,
                image_id: int | None = None) -> int:
        """The smoothed prediction, or ABSTAIN when the top two classes are not told apart at alpha."""
        self._batch(batch_size)
        return self.smoothed.predict(self._address(image_id), self._image(x), n, alpha)
