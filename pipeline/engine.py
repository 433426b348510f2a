"""The sampling engine: votes of a base classifier under Gaussian noise, many images at once.

The reference implementation repeats *one* image `batch` times per forward pass, so the
last batch of every image is short and the device idles between images. Here a forward
batch is filled with noisy samples of *several* images back to back, votes are counted on
the device with one `bincount`, the input buffer is reused, and mixed precision can be
switched on for GPUs. Noise comes from `pipeline.noise`, addressed per (image, phase,
chunk), so the counts do not depend on the batch size or on how images are grouped.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline import smoothing
from pipeline.noise import DEFAULT_CHUNK_SIZE, chunk_noise, plan_chunks


@dataclass(frozen=True)
class VoteRequest:
    """Draw `num_samples` noisy copies of image `image_id` in `phase`."""

    image_id: int
    phase: str
    num_samples: int


def _amp_dtype(amp: bool | str, device: torch.device) -> torch.dtype | None:
    """Mixed precision only where it pays: on CUDA, fp16 by default, or bf16 when asked."""
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if amp == "bf16" else torch.float16


class VoteCounter:
    """Counts f(x + delta) over noisy samples; one instance per model, reused across calls."""

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        sigma: float,
        *,
        seed: int = 0,
        batch_size: int = 400,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        device: torch.device | str | None = None,
        amp: bool | str = False,
    ) -> None:
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size!r}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.num_classes = num_classes
        self.sigma = float(sigma)
        self.seed = seed
        self.batch_size = batch_size
        self.chunk_size = chunk_size
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
    def count(self, images: Mapping[int, torch.Tensor], requests: Sequence[VoteRequest]) -> np.ndarray:
        """Vote counts, int64 [len(requests), num_classes], row i for requests[i].

        `images` maps image id -> [C, H, W] float tensor in [0, 1] (same shape for all).
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
        for row, request in enumerate(requests):
            image = on_device[request.image_id]
            if tuple(image.shape) != shape:
                raise ValueError(f"image {request.image_id} has shape {tuple(image.shape)}, expected {shape}")
            for chunk in plan_chunks(request.image_id, request.phase, request.num_samples, self.chunk_size):
                noise = chunk_noise(chunk, shape, self.sigma, self.seed, self.device)
                start = 0
                while start < chunk.size:
                    take = min(chunk.size - start, self.batch_size - filled)
                    torch.add(noise[start : start + take], image, out=inputs[filled : filled + take])
                    self._owners[filled : filled + take] = row
                    filled += take
                    start += take
                    if filled == self.batch_size:
                        self._classify_into(counts, filled, len(requests))
                        filled = 0
        if filled:
            self._classify_into(counts, filled, len(requests))
        return counts.view(len(requests), self.num_classes).cpu().numpy()


class SmoothedClassifier:
    """g(x) = argmax_c P[f(x + delta) = c]: Cohen et al.'s `Smooth`, on the batched engine."""

    def __init__(self, counter: VoteCounter) -> None:
        self.counter = counter

    def certify(self, image_id: int, image: torch.Tensor, n0: int, n: int, alpha: float) -> tuple[Hashable, float]:
        """(class, L2 radius) or (ABSTAIN, 0.0); selection and estimation noise are independent."""
        if n0 > n:
            raise ValueError(f"n0={n0} must not exceed n={n}")
        selection, estimation = self.counter.count(
            {image_id: image},
            [VoteRequest(image_id, "selection", n0), VoteRequest(image_id, "estimation", n)],
        )
        return smoothing.certify_counts(selection, estimation, self.counter.sigma, alpha)

    def predict(self, image_id: int, image: torch.Tensor, n: int, alpha: float) -> Hashable:
        (counts,) = self.counter.count({image_id: image}, [VoteRequest(image_id, "prediction", n)])
        return smoothing.predict_counts(counts, alpha)
