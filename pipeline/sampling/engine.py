"""The sampling engine: votes of a base classifier under Gaussian noise, many images at once.

The reference implementation repeats *one* image `batch` times per forward pass, so the
last batch of every image is short and the device idles between images. Here a forward
batch is filled with noisy samples of *several* images back to back, votes are counted on
the device with one `bincount`, the input buffer is reused, and mixed precision can be
switched on (`--precision`, `pipeline.sampling.precision`: bf16 on CPUs with native bf16
too). Noise comes from `pipeline.sampling.noise`, addressed per (seed, image, phase, chunk)
by each `SampleRequest`, so the counts do not depend on the batch size or on how images are
grouped. `VoteCounter.count_images` takes the 8-bit images as they travel (uint8 by id) and
groups them by size; the model it runs was made cheaper first (`optimize_for_inference`, below).
"""

from __future__ import annotations

import copy
import operator
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext

import numpy as np
import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from pipeline.config import Sigma, check_value, sound_noise_problem
from pipeline.sampling.noise import DEFAULT_NOISE, SampleRequest, chunk_noise, noise_kind, to_tensor
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
        self.noise = noise_kind(noise).name  # the smoothing noise (`pipeline.sampling.noise`)
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

    def count_images(
        self,
        requests: Sequence[SampleRequest],
        images: Mapping[int, np.ndarray],
        on_image: Callable[[int, int], None] | None = None,
    ) -> tuple[np.ndarray, float]:
        """(counts int64 [len(requests), classes], seconds); images are uint8 [H, W, 3] by id.

        Requests for images of one size are counted in one `count` call, so samples of
        different images fill the same forward batches; each request carries its own noise
        address, so grouping cannot change a count. `on_image(image_id, samples)` is called
        when every request of an image is counted (progress).
        """
        started = time.perf_counter()
        left: dict[int, int] = {}
        for request in requests:
            left[request.image_id] = left.get(request.image_id, 0) + 1
        tensors = {image_id: to_tensor(np.asarray(image)) for image_id, image in images.items()}
        missing = sorted({r.image_id for r in requests} - set(tensors))
        if missing:
            raise KeyError(f"no image given for ids {missing[:5]}")
        counts = np.zeros((len(requests), self.num_classes), dtype=np.int64)
        shapes = sorted({tuple(tensors[r.image_id].shape) for r in requests})
        for shape in shapes:
            rows = [i for i, r in enumerate(requests) if tuple(tensors[r.image_id].shape) == shape]

            def done(position: int, rows: list[int] = rows) -> None:
                request = requests[rows[position]]
                left[request.image_id] -= 1
                if on_image is not None and left[request.image_id] == 0:
                    samples = sum(r.num_samples for r in requests if r.image_id == request.image_id)
                    on_image(request.image_id, samples)

            counts[rows] = self.count(tensors, [requests[i] for i in rows], on_done=done)
        return counts, time.perf_counter() - started


# ------------------------------------------------------------------------------------------
# Make a frozen model cheaper to run before it classifies millions of noisy samples.
#
# Certification runs one model forward over and over, so per-forward waste adds up. Two
# rewrites pay on both CPU and GPU and never change the function computed (up to float
# rounding):
#
# * BatchNorm folded into the preceding convolution (torch.fx): in eval mode BN is an affine
#   map, so it costs a full extra pass over every activation for nothing;
# * channels-last memory: oneDNN (CPU) and cuDNN with tensor cores (GPU) have their fast
#   convolution kernels for NHWC; NCHW inputs make them reorder every layer.
#
# * residual additions in place: torch.fx records `out += identity` as an out-of-place
#   `out + identity`, so a traced ResNet allocates and writes a fresh activation per block
#   (on a 1-thread CPU, ResNet-50 at 224 px: ~8% of the forward) while an exported program
#   keeps `add_`. Giving every traced form back its in-place add makes the classifier forms
#   (`pipeline.models.sources`) run the same kernels; the sum is bit-identical.
#
# On a shared 2-core CPU (benchmarks/certify_throughput.py, DnCNN-small + ResNet-20, batch
# 400) the engine does 1.15x the reference's samples per CPU-second without these rewrites and
# 1.74x with them. A model fx cannot trace (data-dependent control flow) is kept unfused;
# channels-last still applies.

class ChannelsLastInput(nn.Module):
    """Hands the wrapped model its input in channels-last layout (a no-op when it already is).

    The engine fills a plain NCHW buffer; converting once here costs one copy of the batch,
    against a reorder inside every convolution otherwise.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)


class _Tracer(fx.Tracer):
    """fx tracer that keeps modules marked `fx_leaf` (e.g. a diffusion denoiser, whose
    UNet fx cannot trace) as single calls, so the rest of f∘D is still folded."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return bool(getattr(module, "fx_leaf", False)) or super().is_leaf_module(module, qualified_name)


def _trace(model: nn.Module) -> fx.GraphModule:
    root = copy.deepcopy(model)
    return fx.GraphModule(root, _Tracer().trace(root), root.__class__.__name__)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` (eval) with every Conv2d -> BatchNorm2d pair folded into one Conv2d.

    Traced with torch.fx; a BN whose conv output is also used elsewhere is left alone. A
    model fx cannot trace is returned unchanged (with a warning): slower, never wrong.
    """
    model = model.eval()
    try:
        graph_module = _trace(model)
    except Exception as error:  # noqa: BLE001 - untraceable models simply run unfused
        warnings.warn(f"BatchNorm folding skipped ({type(error).__name__}: {error})", RuntimeWarning, stacklevel=2)
        return model
    modules = dict(graph_module.named_modules())
    for node in list(graph_module.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        conv_node = node.args[0]
        if not (
            isinstance(conv_node, fx.Node)
            and conv_node.op == "call_module"
            and isinstance(modules.get(conv_node.target), nn.Conv2d)
            and len(conv_node.users) == 1
        ):
            continue
        fused = fuse_conv_bn_eval(modules[conv_node.target], modules[node.target])
        parent, _, name = conv_node.target.rpartition(".")
        setattr(graph_module.get_submodule(parent) if parent else graph_module, name, fused)
        modules[conv_node.target] = fused
        node.replace_all_uses_with(conv_node)
        graph_module.graph.erase_node(node)
    graph_module.graph.lint()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return graph_module.eval()


# Modules whose output is a fresh tensor that nothing else can alias.
_FRESH_OUTPUT = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)


def add_into(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """`fresh + other`, written into `fresh` when that gives the same tensor (same shape and
    dtype as the sum, no autograd): what `fresh += other` did before tracing."""
    if (not fresh.requires_grad and fresh.shape == torch.broadcast_shapes(fresh.shape, other.shape)
            and fresh.dtype == torch.result_type(fresh, other)):
        return fresh.add_(other)
    return fresh + other


def inplace_residual_adds(graph_module: fx.GraphModule) -> int:
    """Rewrite `a + b` (operator.add of tensors, as fx records `a += b`) into `add_into(a, b)`
    where `a` (or `b`) is the output of a Conv2d / BatchNorm2d / Linear used by nothing else,
    in place. Returns how many were rewritten."""
    modules = dict(graph_module.named_modules())
    rewritten = 0
    for node in list(graph_module.graph.nodes):
        if node.op != "call_function" or node.target is not operator.add or len(node.args) != 2 or node.kwargs:
            continue
        for fresh, other in (node.args, node.args[::-1]):
            if (isinstance(fresh, fx.Node) and isinstance(other, fx.Node) and fresh.op == "call_module"
                    and isinstance(modules.get(fresh.target), _FRESH_OUTPUT) and len(fresh.users) == 1):
                node.target, node.args = add_into, (fresh, other)
                rewritten += 1
                break
    if rewritten:
        graph_module.recompile()
    return rewritten


def _attr(module: nn.Module, target: str) -> torch.Tensor:
    for part in target.split("."):
        module = getattr(module, part)
    return module  # type: ignore[return-value]


def fold_aten_batchnorm(graph_module: fx.GraphModule) -> int:
    """Fold aten.batch_norm (eval) into the aten.conv2d feeding it, in place, in a graph of
    aten ops (a `torch.export` program's module(), which fold_batchnorm cannot see: it has
    no BatchNorm2d modules). Returns how many were folded; anything unusual is left alone."""
    aten = torch.ops.aten
    folded = 0
    for node in list(graph_module.graph.nodes):
        if node.op != "call_function" or node.target != aten.batch_norm.default or len(node.args) < 8:
            continue
        conv, weight, bias, mean, var, training, _, eps = node.args[:8]
        if (training or not isinstance(conv, fx.Node) or conv.target != aten.conv2d.default
                or len(conv.users) != 1 or not all(isinstance(n, fx.Node) and n.op == "get_attr"
                                                   for n in (conv.args[1], mean, var))
                or any(n is not None and not (isinstance(n, fx.Node) and n.op == "get_attr")
                       for n in (weight, bias, conv.args[2] if len(conv.args) > 2 else None))):
            continue
        w = _attr(graph_module, conv.args[1].target).detach()
        scale = torch.rsqrt(_attr(graph_module, var.target).detach() + float(eps))
        if weight is not None:
            scale = scale * _attr(graph_module, weight.target).detach()
        conv_bias = conv.args[2] if len(conv.args) > 2 else None
        b = _attr(graph_module, conv_bias.target).detach() if conv_bias is not None else torch.zeros_like(scale)
        b = (b - _attr(graph_module, mean.target).detach()) * scale
        if bias is not None:
            b = b + _attr(graph_module, bias.target).detach()
        names = [f"_dsmooth_folded_{folded}_{kind}" for kind in ("weight", "bias")]
        graph_module.register_buffer(names[0], (w * scale.view(-1, *([1] * (w.dim() - 1)))).contiguous())
        graph_module.register_buffer(names[1], b.contiguous())
        with graph_module.graph.inserting_before(conv):
            new_w, new_b = (graph_module.graph.get_attr(name) for name in names)
        args = list(conv.args) + [None] * (3 - len(conv.args))
        args[1], args[2] = new_w, new_b
        conv.args = tuple(args)
        node.replace_all_uses_with(conv)
        graph_module.graph.erase_node(node)
        folded += 1
    if folded:
        graph_module.graph.eliminate_dead_code()
        graph_module.recompile()
    return folded


def optimize_for_inference(model: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """Eval-mode, BN-folded, in-place-residual, channels-last version of `model` on
    `device`, for inference only. The one place every classifier form is optimised: an
    nn.Module (torchvision, timm, Hugging Face, factory, object) is traced whole, an
    exported program inside it gets the same folding at the aten level."""
    device = torch.device(device)
    model = fold_batchnorm(model.to(device).eval())
    if isinstance(model, fx.GraphModule):  # a traced copy: aten-level BatchNorm may remain in it
        fold_aten_batchnorm(model)
        inplace_residual_adds(model)
    for module in list(model.modules()):  # exported programs inside (kept whole by fx): their own pass
        program = getattr(module, "program", None)
        if getattr(module, "fx_leaf", False) and isinstance(program, fx.GraphModule):
            module.program = copy.deepcopy(program)
            fold_aten_batchnorm(module.program)
    model = model.to(memory_format=torch.channels_last)
    return ChannelsLastInput(model).eval()
