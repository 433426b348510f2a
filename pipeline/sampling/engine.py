"""The sampling engine: votes of a base classifier under Gaussian noise, many images at once.

The reference implementation repeats *one* image `batch` times per forward pass, so the
last batch of every image is short and the device idles between images. Here a forward
batch is filled with noisy samples of *several* images back to back, votes are counted on
the device with one `bincount`, the input buffer is reused, and mixed precision can be
switched on for GPUs. Noise comes from `pipeline.sampling.noise`, addressed per (seed, image, phase,
chunk) by each `SampleRequest`, so the counts do not depend on the batch size or on how
images are grouped.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn

from pipeline.stats import smoothing
from pipeline.config import Sigma, check_value
from pipeline.sampling.noise import DEFAULT_CHUNK_SIZE, SampleRequest, chunk_noise


def _amp_dtype(amp: bool | str, device: torch.device) -> torch.dtype | None:
    """Mixed precision only where it pays: on CUDA, fp16 by default, or bf16 when asked."""
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if amp == "bf16" else torch.float16


class VoteCounter:
    """Counts f(x + delta) over noisy samples; one instance per model, reused across calls.

    It holds the model and the noise level, never a seed: every request carries the full
    address of its noise, so the counts are a pure function of (model, sigma, requests).
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        sigma: float,
        *,
        batch_size: int = 400,
        device: torch.device | str | None = None,
        amp: bool | str = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size!r}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.num_classes = num_classes
        self.sigma = float(check_value(Sigma, sigma, "sigma"))
        self.batch_size = batch_size
        self.amp_dtype = _amp_dtype(amp, self.device)
        self._inputs: torch.Tensor | None = None
        self._owners = torch.empty(batch_size, dtype=torch.long, device=self.device)

    def _input_buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self._inputs is None or tuple(self._inputs.shape[1:]) != shape:
            self._inputs = torch.empty((self.batch_size, *shape), device=self.device)
        return self._inputs

    def _classify_into(self, counts: torch.Tensor, filled: int, num_requests: int) -> None:
        autocast = (
            torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        )
        with autocast:
            predictions = self.model(self._inputs[:filled]).argmax(dim=1)
        slots = self._owners[:filled] * self.num_classes + predictions
        counts += torch.bincount(slots, minlength=num_requests * self.num_classes)

    @torch.inference_mode()
    def count(
        self,
        images: Mapping[int, torch.Tensor],
        requests: Sequence[SampleRequest],
        on_done: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Vote counts, int64 [len(requests), num_classes], row i for requests[i].

        `images` maps image id -> [C, H, W] float tensor in [0, 1] (same shape for all).
        `on_done(i)` is called as soon as every sample of requests[i] is classified (for
        progress reports; the counts are returned at the end).
        """
        if not requests:
            return np.zeros((0, self.num_classes), dtype=np.int64)
        missing = {r.image_id for r in requests} - set(images)
        if missing:
            raise KeyError(f"no image given for ids {sorted(missing)[:5]}")
        on_device = {i: images[i].to(self.device, torch.float32) for i in {r.image_id for r in requests}}
        shape = tuple(next(iter(on_device.values())).shape)
        inputs = self._input_buffer(shape)
        counts = torch.zeros(len(requests) * self.num_classes, dtype=torch.long, device=self.device)
        filled = 0
        placed: list[int] = []  # requests whose samples all sit in the buffer or earlier batches

        def flush() -> None:
            if filled:
                self._classify_into(counts, filled, len(requests))
            if on_done is not None:
                for done in placed:
                    on_done(done)
            placed.clear()

        for row, request in enumerate(requests):
            image = on_device[request.image_id]
            if tuple(image.shape) != shape:
                raise ValueError(f"image {request.image_id} has shape {tuple(image.shape)}, expected {shape}")
            for chunk in request.chunks():
                noise = chunk_noise(chunk, shape, self.sigma, self.device)
                start = 0
                while start < chunk.size:
                    take = min(chunk.size - start, self.batch_size - filled)
                    torch.add(noise[start : start + take], image, out=inputs[filled : filled + take])
                    self._owners[filled : filled + take] = row
                    filled += take
                    start += take
                    if filled == self.batch_size:
                        flush()
                        filled = 0
            placed.append(row)
        if filled or placed:
            flush()
        return counts.view(len(requests), self.num_classes).cpu().numpy()


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
        """(class, L2 radius) or (ABSTAIN, 0.0)."""
        if n0 > n:
            raise ValueError(f"n0={n0} must not exceed n={n}")
        selection, estimation = self.counter.count(
            {image_id: image}, [self._request(image_id, "selection", n0), self._request(image_id, "estimation", n)]
        )
        decision = smoothing.certify_matrix(selection, estimation, self.counter.sigma, alpha)
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
    ) -> None:
        counter = VoteCounter(base_classifier, num_classes, sigma, batch_size=batch_size, device=device, amp=amp)
        self.smoothed = SmoothedClassifier(counter, seed=seed, chunk_size=chunk_size)
        self.base_classifier = counter.model
        self.num_classes = num_classes
        self.sigma = counter.sigma
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
                                                device=old.device, amp=bool(old.amp_dtype))
            self.smoothed.counter.amp_dtype = old.amp_dtype

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int | None = None, *,
                image_id: int | None = None) -> tuple[int, float]:
        """(predicted class, certified L2 radius), or (ABSTAIN, 0.0)."""
        self._batch(batch_size)
        return self.smoothed.certify(self._address(image_id), self._image(x), n0, n, alpha)

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int | None = None, *,
                image_id: int | None = None) -> int:
        """The smoothed prediction, or ABSTAIN when the top two classes are not told apart at alpha."""
        self._batch(batch_size)
        return self.smoothed.predict(self._address(image_id), self._image(x), n, alpha)
