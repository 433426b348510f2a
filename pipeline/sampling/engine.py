"""The sampling engine: votes of a base classifier under Gaussian noise, many images at once.

The reference implementation repeats *one* image `batch` times per forward pass, so the
last batch of every image is short and the device idles between images. Here a forward
batch is filled with noisy samples of *several* images back to back, votes are counted on
the device with one `bincount`, the input buffer is reused, and mixed precision can be
switched on (`--precision`, `pipeline.sampling.precision`: bf16 on CPUs with native bf16 too). Noise comes from `pipeline.sampling.noise`, addressed per (seed, image, phase,
chunk) by each `SampleRequest`, so the counts do not depend on the batch size or on how
images are grouped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn

from pipeline.config import Sigma, check_value, sound_noise_problem
from pipeline.sampling.noise_kinds import DEFAULT_NOISE, noise_kind
from pipeline.sampling.noise import SampleRequest, chunk_noise
from pipeline.sampling.precision import DEFAULT_PRECISION, amp_as_precision, compute_dtype
from pipeline.sampling.sound import image_levels, sound_inputs


def _amp_dtype(amp: bool | str, device: torch.device, precision: str = DEFAULT_PRECISION) -> torch.dtype | None:
    """The forward passes' autocast dtype: `precision`'s, on every device. `amp` is no second
    switch (it used to turn fp16 on under fp32 on CUDA, recorded as fp32): callers map it
    with `amp_as_precision` first, so the precision recorded is the arithmetic used."""
    return compute_dtype(precision, device)


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
        precision: str = DEFAULT_PRECISION,
        sound: bool = False,
        noise: str = DEFAULT_NOISE,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size!r}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.num_classes = num_classes
        self.sigma = float(check_value(Sigma, sigma, "sigma"))
        self.noise = noise_kind(noise).name  # the smoothing noise (`pipeline.sampling.noise_kinds`)
        problem = sound_noise_problem(sound, self.noise)
        if problem:
            raise ValueError(problem)
        self.batch_size = batch_size
        precision = amp_as_precision(amp, precision, self.device)  # deprecated switch -> the one setting
        self.precision = precision
        self.sound = sound  # floating-point-sound noise (`pipeline.sampling.sound`)
        self.amp_dtype = _amp_dtype(amp, self.device, precision)
        self.input_dtype = compute_dtype(precision, self.device) or torch.float32
        self._inputs: torch.Tensor | None = None
        self._owners = torch.empty(batch_size, dtype=torch.long, device=self.device)

    def _input_buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self._inputs is None or tuple(self._inputs.shape[1:]) != shape:
            # The noisy inputs are written straight in the compute dtype: no fp32 copy that
            # autocast would convert again before the first convolution.
            self._inputs = torch.empty((self.batch_size, *shape), device=self.device,
                                       dtype=self.input_dtype)
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
        levels = {i: image_levels(image, i) for i, image in on_device.items()} if self.sound else {}
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
                if self.sound:  # q / 255 on the 8-bit grid, exact: `pipeline.sampling.sound`
                    noisy = sound_inputs(levels[request.image_id], chunk, self.sigma)
                else:
                    noise = chunk_noise(chunk, shape, self.sigma, self.device, noise=self.noise)
                start = 0
                while start < chunk.size:
                    take = min(chunk.size - start, self.batch_size - filled)
                    if self.sound:
                        inputs[filled : filled + take].copy_(noisy[start : start + take])
                    else:
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
