"""Make a frozen model cheaper to run before it classifies millions of noisy samples.

Certification runs one model forward over and over, so per-forward waste adds up. Two
rewrites pay on both CPU and GPU and never change the function computed (up to float
rounding):

* BatchNorm folded into the preceding convolution (torch.fx): in eval mode BN is an affine
  map, so it costs a full extra pass over every activation for nothing;
* channels-last memory: oneDNN (CPU) and cuDNN with tensor cores (GPU) have their fast
  convolution kernels for NHWC; NCHW inputs make them reorder every layer.

* residual additions in place: torch.fx records `out += identity` as an out-of-place
  `out + identity`, so a traced ResNet allocates and writes a fresh activation per block
  (on a 1-thread CPU, ResNet-50 at 224 px: ~8% of the forward) while an exported program
  keeps `add_`. Giving every traced form back its in-place add makes the classifier forms
  (`pipeline.models.sources`) run the same kernels; the sum is bit-identical.

On a shared 2-core CPU (benchmarks/certify_throughput.py, DnCNN-small + ResNet-20, batch
400) the engine does 1.15x the reference's samples per CPU-second without these rewrites and
1.74x with them. A model fx cannot trace (data-dependent control flow) is kept unfused;
channels-last still applies.
"""

from __future__ import annotations

import copy
import operator
import warnings

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


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
