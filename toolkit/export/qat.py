"""Quantization-aware fine-tuning (QAT): the recovery path for int8 that costs no speed.

The trained model is fine-tuned with PyTorch's own fake quantization (``torch.ao.quantization.
FakeQuantize``) placed where ``quantize.quantize_int8`` puts its QDQ pairs, with the same number
formats: every Conv/Linear weight per output channel, symmetric, 8 bits in [-127, 127] (7 bits in
[-64, 64] with ``weight_bits=7``, ONNX Runtime's ``reduce_range``), and the input and output of every
Conv/Linear per tensor, symmetric int8 in [-127, 127] or asymmetric uint8 in [0, 255], except the
model's output, which the export leaves float (``quantize.float_outputs``). BatchNorm is
folded into its convolution first, as the ONNX export folds it, so the weights being fake-quantized
are the ones the exported file holds (``fold_batchnorm``: module names and exported graph unchanged,
so ``verify`` compares the int8 file with the fp32 one layer by layer); a BatchNorm that does not
follow a convolution (pre-activation ResNets) stays, frozen.

The loss is distillation from the trained model itself (KL divergence of the softmax outputs), not
the labels: the goal is an int8 model that answers as the float model does (what ``verify`` gates),
not a better-trained one. Dropout is off and BatchNorm statistics are frozen throughout.

The tuned float model then goes through the same post-training export as any other (calibration
on the same images, the same QDQ placement, TensorRT's rules included), so the int8 file has the
same graph, size and speed as post-training int8. Weight scales are per-channel max |w|, computed
from the current weights at every step (``averaging_constant=1``), so the exported file's weights
are exactly the ones fine-tuning saw; activation scales are calibrated again, on the tuned model.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from toolkit.core.errors import ToolkitError, check_choice
from toolkit.core.progress import Progress

LEARNING_RATE = 1e-4  # Adam, cosine to zero: small steps from a trained model
BATCH_SIZE = 128
QUANTIZED_MODULES = (nn.Conv2d, nn.Linear)  # what quantize.QUANTIZED_OPS (Conv, Gemm, MatMul) come from


def conv_batchnorm_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, batchnorm) module names where the BatchNorm takes that convolution's output and nothing
    else does: the pairs the ONNX export folds. Found by tracing with ``torch.fx``; none if it cannot trace."""
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - a model fx cannot trace keeps its BatchNorms (frozen)
        return []
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0]
        if isinstance(src, torch.fx.Node) and src.op == "call_module" and isinstance(modules.get(src.target), nn.Conv2d) and len(src.users) == 1:
            pairs.append((src.target, node.target))
    return pairs


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of ``model`` in which each convolution followed by its BatchNorm holds the folded weights
    (``torch.nn.utils.fusion.fuse_conv_bn_weights``, bias included) and the BatchNorm is left as a
    fixed identity (scale 1, shift 0): the same module names and the same
    exported graph as the trained model, with the weights the exported file holds. Returns it and
    how many pairs were folded. Other BatchNorms (pre-activation ResNets) stay as they are, frozen."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    folded = copy.deepcopy(model).eval()
    modules = dict(folded.named_modules())
    pairs = conv_batchnorm_pairs(folded)
    with torch.no_grad():
        for conv_name, bn_name in pairs:
            conv, bn = modules[conv_name], modules[bn_name]
            weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
            conv.weight.copy_(weight)
            # the bias goes into the convolution (given one if it had none), so that the convolution's
            # output, where the export quantizes, is the folded one, bias included
            conv.bias = nn.Parameter(bias.detach().clone())
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0)
            bn.weight.fill_(float(torch.sqrt(torch.tensor(1.0 + bn.eps))))  # scale / sqrt(var + eps) = 1
            bn.bias.zero_()
            bn.weight.requires_grad_(False)
            bn.bias.requires_grad_(False)
    return folded, len(pairs)


def _weight_fake_quant(weight_bits: int):
    from torch.ao.quantization import FakeQuantize, MovingAveragePerChannelMinMaxObserver

    qmax = 127 if weight_bits == 8 else 64
    return FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, averaging_constant=1.0, quant_min=-qmax, quant_max=qmax,
                        dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0)


def _activation_fake_quant(activations: str):
    """Per-tensor, ranges from the min and max over all calibration images: ONNX Runtime's ``minmax``
    calibration (a moving average would follow each batch's own, narrower range instead)."""
    from torch.ao.quantization import FakeQuantize, MinMaxObserver

    if activations == "int8":
        return FakeQuantize(observer=MinMaxObserver, quant_min=-127, quant_max=127, dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    return FakeQuantize(observer=MinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8, qscheme=torch.per_tensor_affine)


class FakeQuantized:
    """Fake quantization attached to a model's Conv/Linear layers (weights by parametrization, inputs
    and outputs by hooks), removable so that the plain float model remains."""

    def __init__(self, model: nn.Module, activations: str, weight_bits: int):
        from torch.nn.utils import parametrize

        self.model, self.handles, self.layers, self.activation_quants = model, [], [], []
        for module in model.modules():
            if not isinstance(module, QUANTIZED_MODULES):
                continue
            parametrize.register_parametrization(module, "weight", _weight_fake_quant(weight_bits))
            at_input, at_output = _activation_fake_quant(activations), _activation_fake_quant(activations)
            module.add_module("input_fake_quant", at_input)
            module.add_module("output_fake_quant", at_output)
            self.handles.append(module.register_forward_pre_hook(lambda m, args: (m.input_fake_quant(args[0]), *args[1:])))
            self.handles.append(module.register_forward_hook(lambda m, args, out: m.output_fake_quant(out)))
            self.layers.append(module)
            self.activation_quants += [at_input, at_output]
        if not self.layers:
            raise ToolkitError("QAT: the model has no Conv or Linear layer to quantize")

    def set_ranges(self, ranges: dict[str, tuple[float, int, float | None, int | None]]) -> int:
        """Fix the activation quantization of the layers named in ``ranges`` (module name: input scale,
        zero point, output scale, zero point), e.g. the ones the export's own calibration chose; an
        output scale of None leaves that layer's output float, as the export leaves the model's output
        (``quantize.float_outputs``). Returns how many layers matched."""
        names = {module: name for name, module in self.model.named_modules()}
        found = 0
        for module in self.layers:
            # a wrapped export (uint8 input, NHWC) names the same weights with a prefix: "model.features.0"
            given = next((r for key, r in ranges.items() if key == names[module] or key.endswith("." + names[module])), None)
            if given is None:
                continue
            if given[2] is None and not isinstance(module.output_fake_quant, nn.Identity):
                self.activation_quants.remove(module.output_fake_quant)
                module.output_fake_quant = nn.Identity()
            for fq, scale, zero in ((module.input_fake_quant, given[0], given[1]), (module.output_fake_quant, given[2], given[3])):
                if scale is None:
                    continue
                fq.scale.copy_(torch.tensor([scale], dtype=fq.scale.dtype))
                fq.zero_point.copy_(torch.tensor([zero], dtype=fq.zero_point.dtype))
            found += 1
        return found

    def calibrating(self, on: bool) -> None:
        """Activation observers on and their fake quantization off (calibration), or the ranges found
        fixed and fake quantization on (fine-tuning: the ranges the export's calibration finds)."""
        for fq in self.activation_quants:
            if on:
                fq.enable_observer()
                fq.disable_fake_quant()
            else:
                fq.disable_observer()
                fq.enable_fake_quant()

    def remove(self) -> nn.Module:
        """Detach everything; the model keeps its tuned float weights (the latent ones, unquantized:
        the export quantizes them with the same per-channel scales)."""
        from torch.nn.utils import parametrize

        for handle in self.handles:
            handle.remove()
        for module in self.layers:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            del module.input_fake_quant, module.output_fake_quant
        return self.model


def fine_tune(model: nn.Module, images: np.ndarray, calib: np.ndarray, *, epochs: int, activations: str = "int8", weight_bits: int = 8,
              ranges: dict[str, tuple[float, int, float, int]] | None = None, seed: int = 0, console: Console | None = None) -> tuple[nn.Module, dict]:
    """Fine-tune ``model`` (a trained float model, left unchanged) with fake quantization for
    ``epochs`` passes over ``images`` (model inputs, as the deployed model is fed them), distilling
    from the model itself. Activation ranges: ``ranges`` (``FakeQuantized.set_ranges``: best, the
    export's own calibration of the folded model) where given, else min/max over ``calib``; fixed
    while fine-tuning. Returns the tuned float model (BatchNorm folded) and a report for the manifest."""
    check_choice("int8 activation type", activations, ("int8", "uint8"))
    check_choice("int8 weight bits", weight_bits, (8, 7))
    if epochs < 1:
        raise ToolkitError(f"--qat-epochs must be 1 or more, not {epochs}")
    if len(images) == 0:
        raise ToolkitError("QAT: no training images")
    console = console or Console(stderr=True)
    started = time.perf_counter()
    teacher = copy.deepcopy(model).cpu().eval()
    student, folded = fold_batchnorm(teacher)
    for p in teacher.parameters():
        p.requires_grad_(False)
    quant = FakeQuantized(student, activations, weight_bits)
    x_all = torch.from_numpy(np.ascontiguousarray(images))

    quant.calibrating(True)
    with torch.no_grad():
        for i in range(0, len(calib), BATCH_SIZE):
            student(torch.from_numpy(np.ascontiguousarray(calib[i : i + BATCH_SIZE])))
    quant.calibrating(False)
    matched = quant.set_ranges(ranges or {})

    # the whole model stays in eval mode: BatchNorm statistics frozen, dropout off; gradients still flow
    student.eval()
    steps_per_epoch = (len(x_all) + BATCH_SIZE - 1) // BATCH_SIZE
    params = [p for p in student.parameters() if p.requires_grad]
    # weights pruned to zero (``toolkit prune``) stay zero: the tuned model keeps the pruned model's sparsity
    pruned = {p: p == 0 for p in params if p.dim() > 1 and bool((p == 0).any())}
    optimizer = torch.optim.Adam(params, lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    with Progress(console, unit="batches") as progress:
        for epoch in range(1, epochs + 1):
            order = torch.randperm(len(x_all), generator=generator)
            task = progress.add_task(f"qat: epoch {epoch}/{epochs}", total=steps_per_epoch)
            total, agree = 0.0, 0
            for i in range(0, len(order), BATCH_SIZE):
                x = x_all[order[i : i + BATCH_SIZE]]
                with torch.no_grad():
                    target = F.log_softmax(teacher(x), dim=1)
                logits = student(x)
                loss = F.kl_div(F.log_softmax(logits, dim=1), target, log_target=True, reduction="batchmean")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                with torch.no_grad():
                    for p, zero in pruned.items():
                        p.masked_fill_(zero, 0.0)
                total += float(loss.detach()) * len(x)
                agree += int((logits.argmax(1) == target.argmax(1)).sum())
                progress.advance(task)
            progress.remove_task(task)
            losses.append(total / len(x_all))
            console.print(f"qat: epoch {epoch}/{epochs}: distillation loss {losses[-1]:.5f}, fake-quantized model agrees with the "
                          f"float model on {100 * agree / len(x_all):.2f}% of {len(x_all):,} training images")
    tuned = quant.remove().eval()
    report = {"epochs": epochs, "batchnorms_folded": folded, "layers": len(quant.layers), "ranges_from_export": matched, "images": int(len(x_all)),
              "loss": "distillation (KL) from the trained model", "optimizer": "adam",
              "learning_rate": LEARNING_RATE, "batch_size": BATCH_SIZE, "distillation_loss": [round(v, 6) for v in losses],
              "seconds": round(time.perf_counter() - started, 2)}
    return tuned, report
