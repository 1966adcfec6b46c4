"""Stage 7, write (LCE flatbuffer): a binary model as a TensorFlow Lite file for Larq Compute Engine.

    model.tflite   the whole network at the packed file's stored input size, batch 1, float32 input in
                   NHWC order ([1, H, W, C]: the PyTorch input [1, C, H, W] transposed, normalised as
                   the training data was); a 4-D output is NHWC, a [1, classes] output as it is

Written with the `flatbuffers` package and the TFLite schema's builder functions (the `tflite`
package); no TensorFlow. The binary layers' signs come from `pack` (the same s * B that
`load_packed` rebuilds), every other tensor as trained. Inside, every image tensor is NHWC.

Ops emitted, and why each one computes what the PyTorch model computes:

- `LceQuantize` (custom): bit = (x < 0), which is irconvert's sign(0) = +1 and bit 1 = -1 (pack.py).
  An input threshold tau (SD-BNN's ASD, ReActNet's RSign) is a `SUB` x - tau in front: IEEE
  subtraction is 0 exactly at x = tau and monotone, so (x - tau < 0) is the frozen layer's bit.
- `LceBconv2d` (custom), a W1A1 conv or Linear (a 1x1 conv on [N, 1, 1, C]). LCE's accumulator is
  the XOR-popcount a in 0..K (K = kh * kw * C_in), and dot = K - 2a is the +-1 convolution the
  PyTorch layer computes before its scale; float output is dot * m[o] + b[o]. m = s (the layer's
  per-channel scale) and b = its bias; a BatchNorm after it (eval, z = alpha * y + beta) folds into
  m = alpha * s, b = alpha * bias + beta (one float rounding each: ~1e-7 relative; LCE's kernels then compute
  (2a) * (-m) + (b + K * m), the latter rounded once to float in bconv2d.cc, so an exact model stays exact: a
  model whose every float is a short binary fraction agrees bit for bit, its ties at 0 included). The filter is
  LCE's OHWI with every (o, kh, kw) pixel's channels packed into their own words; irconvert's file
  packs kh * kw * C_in densely, so the signs are repacked per pixel (the same words when C_in % 32 == 0).
- Zero padding. PyTorch pads the +-1 input with 0 on every side; LCE's `pad_values=0` with SAME
  padding is exact zero padding, but TF's SAME puts an odd pad at the bottom/right. Where TF's SAME
  pads equal PyTorch's (stride 1 with k = 2p + 1, or odd sizes), C_in is even (the reference
  kernel's condition) and the input is at least as large as the filter (LCE's optimized kernels
  correct the padding one side at a time, and were measured 0.7 off on a 2x2 input with a 3x3
  filter), the conv is SAME with `pad_values=0`. Otherwise (stride 2 on even sizes):
  `PAD` the bitpacked input with 0 words (every padded tap +1), a VALID `LceBconv2d`, and an `ADD`
  of the correction -m[o] * (sum of the weights on padded taps), computed in the file by a `CONV_2D`
  of a constant 0/1 mask of the padded border [1, H', W', 1] with the filter -m[o] * sum_c B[o, c]
  (a few hundred floats instead of a correction the size of the output).
- Bitpacked output between chained binary layers: where a W1A1 layer with no padding (1x1 convs,
  Linears) is followed only by per-channel ops (BatchNorm, Hardtanh, ReLU, RPReLU) whose every user is
  a W1A1 layer with the same threshold, those readers only see sign(...), a function of a alone.
  The chain's own PyTorch modules are evaluated at every a in 0..K, and where the -1 set is
  {a > t} the threshold is t; where it is {a < t'} the channel's weights are flipped (a becomes
  K - a). LCE writes bit = (a > thr), so these bits are the PyTorch signs exactly. A padded producer
  stays float (its border correction differs per position, no per-channel threshold expresses it).
- Float layers are TFLite builtins, with PyTorch's symmetric padding as `PAD` + VALID where TF's SAME
  would differ: `CONV_2D` (a BatchNorm after it folded into the weights), `DEPTHWISE_CONV_2D`,
  `FULLY_CONNECTED`, `MAX_POOL_2D` (`PADV2` with -inf, which is what PyTorch's max-pool pads with),
  `AVERAGE_POOL_2D`, `MEAN` (global average pooling), `MUL` + `ADD` (an unfused BatchNorm), `ADD`
  (residual sums), `RELU`, `RELU6`, `RELU_N1_TO_1` / `MAXIMUM` + `MINIMUM` (Hardtanh), `SUB` + `PRELU`
  + `ADD` (RPReLU: beta * y for y <= 0, y above, at y = 0 both 0), `RESHAPE` / `TRANSPOSE` (flatten
  in PyTorch's NCHW order).
- The mobile families' float pieces: `LOGISTIC` (Sigmoid), `LOGISTIC` + `MUL` (SiLU, x * sigmoid(x)),
  `HARD_SWISH`, `ADD` 3 + `RELU6` + `DIV` 6 (Hardsigmoid, PyTorch's order), and `MUL` of two tensors (a
  squeeze-excitation product x * g, the [1, 1, 1, C] gate broadcast) or by a constant. Their TFLite kernels
  are not PyTorch's bit for bit (exp and its rounding: ~1e-6 relative, measured on EfficientNet-B0 and
  MobileNetV3). timm's BatchNormAct2d applies its activation before the Bi-Real shortcut's sum
  (ShortcutMixin adds S(x) to the module's whole output); torchvision's stochastic depth is the identity
  in eval mode.
- The Bi-Real shortcut S(x) (shortcut.bireal_shortcut), step by step in its order. The stride's pool:
  `AVERAGE_POOL_2D` SAME with filter = stride, which counts only the valid pixels, as PyTorch's
  ceil-mode pool with count_include_pad=False does, and whose windows are PyTorch's where TF's SAME pads
  nothing before (stride * out - size <= 1 per axis, always for stride 2); otherwise `PAD` with zeros after,
  VALID (sum / (sh * sw)) and `MUL` by the constant sh * sw / (valid pixels) per position (two roundings:
  ~1e-7 relative). The centred crop or pad to the conv's output size: `SLICE` from (-d) // 2 / `PAD` with
  d // 2 zeros before and the rest after (exact). Widening: `TILE` by ceil(C_out / C_in), then `SLICE` to
  C_out (channel o = o mod C_in, exact). Shrinking: `SLICE` each group of C_out channels (the last, partial
  one `PAD`ded with zeros: + 0 leaves the other sums as they are), `ADD` them left to right and `DIV` by
  the constant n_o: the same additions in the same order and the one division PyTorch does, bitwise.
  The gate is a `MUL`, the sum with the BatchNorm's output an `ADD`.
- A W1A32 layer (binary weights, float input: LCE has no such op) keeps its weights as bits in the
  file: `LceDequantize` turns them into a float +-1 filter inside the graph (bit 1 = -1, exactly),
  a float `CONV_2D` / `FULLY_CONNECTED` sums +-x exactly as the PyTorch conv of the +-1 signs would,
  and `MUL` by s (a BatchNorm after it folded in) + `ADD` of the bias give s * (B (*) x) + bias.

Anything else is refused with one IRConvertError naming the layer, and nothing is written.
"""

from __future__ import annotations

import copy
import importlib
import math
import operator
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .errors import IRConvertError, flag
from .fileformat import WORD_BITS, atomic_path
from .graph import _Tracer as _GraphTracer
from .layer_summary import default_input_size
from .layers import BinaryMixin
from .methods.react import RPReLU
from .pack import binary_weight, pack_layer, pack_signs
from .shortcut import ShortcutMixin
from .errors import result_log

try:
    from timm.layers.linear import Linear as _TimmLinear
    from timm.layers.norm_act import BatchNormAct2d
except ImportError:  # pragma: no cover - timm is a dependency
    BatchNormAct2d = _TimmLinear = None

_ADDS = (operator.add, operator.iadd, torch.add)
_MULS = (operator.mul, operator.imul, torch.mul, "mul", "mul_")
_GATE_ACTS = {"silu": nn.SiLU, "sigmoid": nn.Sigmoid, "hardswish": nn.Hardswish, "hardsigmoid": nn.Hardsigmoid}
_GATE_FUNCS = {F.silu: "silu", torch.sigmoid: "sigmoid", "sigmoid": "sigmoid", F.sigmoid: "sigmoid",
               F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid"}
_F32, _I32 = 0, 2  # TensorType FLOAT32, INT32
_SAME, _VALID = 0, 1  # Padding (TFLite's enum, and LCE's option)


def export_tflite(src: Union[str, os.PathLike, nn.Module], path: Union[str, os.PathLike]) -> Path:
    """Write `src` (a packed.safetensors path or a binarized model) as a TFLite file for Larq Compute Engine
    at `path`, for batch 1 at the model's stored input size; IRConvertError naming a layer it cannot express."""
    net = deployment_model(src)
    size = tuple(net.irconvert_input_size or default_input_size(net))
    data = to_flatbuffer(net, size)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def export_tflite_file(path: Union[str, os.PathLike], out: Union[str, os.PathLike, None] = None,
                       overwrite: bool = False, log=print) -> Path:
    """`irconvert export RUN|packed.safetensors --format tflite`: model.tflite into `out` (default: beside the
    packed file); a different model.tflite already there is kept unless `overwrite`."""
    path = Path(path)
    packed = path / "packed.safetensors" if path.is_dir() else path
    if not packed.is_file():
        raise IRConvertError(f"{packed}: file not found; pass a run folder or its packed.safetensors "
                             "(export it first: irconvert export RUN)")
    target = Path(out or packed.parent) / "model.tflite"
    net = deployment_model(packed)
    data = to_flatbuffer(net, tuple(net.irconvert_input_size or default_input_size(net)))
    if target.is_file() and not overwrite:
        if target.read_bytes() == data:
            result_log(log)(f"{target}: already there, the same")
            return target
        raise IRConvertError(f"{target}: exists and differs from this export; pass {flag('overwrite')} to replace it")
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    result_log(log)(f"wrote {target} ({len(data) / 2**20:.2f} MiB; {packed.name} "
                    f"{packed.stat().st_size / 2**20:.2f} MiB)")
    return target


def deployment_model(src: Union[str, os.PathLike, nn.Module]) -> nn.Module:
    """Return the frozen deployment model of `src`: load_packed of a file, or a frozen copy of a binarized model."""
    if isinstance(src, (str, os.PathLike)):
        from .verify import load_packed  # the packed file's reader rebuilds the architecture

        return load_packed(src)
    if not any(isinstance(m, BinaryMixin) for m in src.modules()):
        raise IRConvertError("export_tflite: the model is not binarized; call irconvert.binarize(model) first")
    net = copy.deepcopy(src).eval()
    for m in net.modules():
        if isinstance(m, BinaryMixin) and not m.binary_frozen:
            p = pack_layer(m)  # the deployment signs, scale and threshold, as save_packed stores them
            shape = tuple(m.latent_weight.shape)
            m.freeze(binary_weight(p["bits"], p.get("exp", p.get("scale")), shape), p.get("threshold"))
    return net


class _Tracer(_GraphTracer):
    def is_leaf_module(self, m: nn.Module, name: str) -> bool:
        # the subclasses irconvert swaps in (fused.hardtanh's Hardtanh keeping its output) stay one op each
        return (isinstance(m, (BinaryMixin, RPReLU, nn.modules.batchnorm._BatchNorm, nn.Hardtanh, nn.ReLU,
                               nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Identity, nn.Dropout, nn.Flatten))
                or (BatchNormAct2d is not None and isinstance(m, BatchNormAct2d)) or super().is_leaf_module(m, name))


def to_flatbuffer(net: nn.Module, input_size: tuple[int, ...]) -> bytes:
    """Return the .tflite bytes of frozen model `net` for one input of (C, H, W) `input_size`."""
    try:
        graph = _Tracer().trace(net)
    except Exception as exc:
        raise IRConvertError(f"export tflite: the model does not trace with torch.fx ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); only traceable models export") from None
    gm = fx.GraphModule(net, graph)
    values = _run(gm, torch.zeros((1,) + tuple(input_size)))
    return _Converter(gm, values).convert()


@torch.no_grad()
def _run(gm: fx.GraphModule, x: torch.Tensor) -> dict[fx.Node, object]:
    """Every node's value on example input `x` (shapes; and the chain decisions read the modules themselves)."""
    values: dict[fx.Node, object] = {}

    class _Record(fx.Interpreter):
        def run_node(self, n):
            values[n] = super().run_node(n)
            return values[n]

    _Record(gm).run(x)
    return values


class _Flat:
    """The flatbuffer being assembled: tensors, constant buffers, operators and their codes."""

    def __init__(self):
        self.tensors: list[tuple[str, tuple[int, ...], int, int]] = []  # name, shape, type, buffer
        self.buffers: list[bytes] = [b""]  # buffer 0: no data (the schema's convention)
        self.ops: list[tuple[int, list[int], list[int], Optional[tuple], Optional[bytes]]] = []
        self.codes: dict[Union[int, str], int] = {}

    def tensor(self, shape, dtype: int = _F32, name: str = "") -> int:
        self.tensors.append((name or f"t{len(self.tensors)}", tuple(int(s) for s in shape), dtype, 0))
        return len(self.tensors) - 1

    def const(self, array, name: str = "") -> int:
        a = np.ascontiguousarray(np.asarray(array))
        a = a.astype(np.int32 if a.dtype.kind in "iub" else np.float32)
        self.buffers.append(a.astype(a.dtype.newbyteorder("<")).tobytes())
        self.tensors.append((name or f"c{len(self.tensors)}", a.shape, _I32 if a.dtype == np.int32 else _F32,
                             len(self.buffers) - 1))
        return len(self.tensors) - 1

    def op(self, code: Union[int, str], inputs: list[int], outputs: list[int], options: Optional[tuple] = None,
           custom: Optional[dict] = None) -> None:
        index = self.codes.setdefault(code, len(self.codes))
        blob = None
        if custom is not None:
            from flatbuffers import flexbuffers

            blob = bytes(flexbuffers.Dumps(custom)) if custom else b""
        self.ops.append((index, inputs, outputs, options, blob))

    def _buffers(self, b) -> list[int]:
        s = _schema
        buffers = []
        for data in self.buffers:
            vec = None
            if data:
                b.StartVector(1, len(data), 16)  # constants aligned to 16 bytes
                b.head -= len(data)
                b.Bytes[b.head:b.head + len(data)] = data
                vec = b.EndVector()
            s("Buffer").BufferStart(b)
            if vec is not None:
                s("Buffer").BufferAddData(b, vec)
            buffers.append(s("Buffer").BufferEnd(b))
        return buffers

    def _tensors(self, b) -> list[int]:
        s = _schema
        tensors = []
        for name, shape, dtype, buf in self.tensors:
            n = b.CreateString(name)
            sh = _ints(b, shape)
            T = s("Tensor")
            T.TensorStart(b)
            T.TensorAddShape(b, sh)
            T.TensorAddType(b, dtype)
            T.TensorAddBuffer(b, buf)
            T.TensorAddName(b, n)
            tensors.append(T.TensorEnd(b))
        return tensors

    def serialize(self, inputs: list[int], outputs: list[int]) -> bytes:
        import flatbuffers

        s = _schema
        b = flatbuffers.Builder(1 << 20)
        buffers, tensors = self._buffers(b), self._tensors(b)
        ops = []
        for index, ins, outs, options, blob in self.ops:
            opt = options[1](b) if options else None
            cust = b.CreateByteVector(blob) if blob else None
            vi, vo = _ints(b, ins), _ints(b, outs)
            O = s("Operator")
            O.OperatorStart(b)
            O.OperatorAddOpcodeIndex(b, index)
            O.OperatorAddInputs(b, vi)
            O.OperatorAddOutputs(b, vo)
            if options:
                O.OperatorAddBuiltinOptionsType(b, options[0])
                O.OperatorAddBuiltinOptions(b, opt)
            if blob is not None:
                O.OperatorAddCustomOptionsFormat(b, 0)  # FLEXBUFFERS
                if cust is not None:
                    O.OperatorAddCustomOptions(b, cust)
            ops.append(O.OperatorEnd(b))
        G = s("SubGraph")
        vt, vops = _offsets(b, tensors), _offsets(b, ops)
        vin, vout = _ints(b, inputs), _ints(b, outputs)
        gname = b.CreateString("main")
        G.SubGraphStart(b)
        G.SubGraphAddTensors(b, vt)
        G.SubGraphAddInputs(b, vin)
        G.SubGraphAddOutputs(b, vout)
        G.SubGraphAddOperators(b, vops)
        G.SubGraphAddName(b, gname)
        graph = G.SubGraphEnd(b)
        codes = []
        for code in sorted(self.codes, key=self.codes.get):
            C = s("OperatorCode")
            custom = b.CreateString(code) if isinstance(code, str) else None
            builtin = _BUILTIN["CUSTOM"] if isinstance(code, str) else code
            C.OperatorCodeStart(b)
            C.OperatorCodeAddDeprecatedBuiltinCode(b, min(builtin, 127))
            if custom is not None:
                C.OperatorCodeAddCustomCode(b, custom)
            C.OperatorCodeAddVersion(b, 1)
            C.OperatorCodeAddBuiltinCode(b, builtin)
            codes.append(C.OperatorCodeEnd(b))
        vcodes, vgraphs, vbufs = _offsets(b, codes), _offsets(b, [graph]), _offsets(b, buffers)
        desc = b.CreateString("irconvert: binary network for Larq Compute Engine")
        M = s("Model")
        M.ModelStart(b)
        M.ModelAddVersion(b, 3)
        M.ModelAddOperatorCodes(b, vcodes)
        M.ModelAddSubgraphs(b, vgraphs)
        M.ModelAddDescription(b, desc)
        M.ModelAddBuffers(b, vbufs)
        b.Finish(M.ModelEnd(b), file_identifier=b"TFL3")
        return bytes(b.Output())


def _schema(name: str):
    """The `tflite` package's generated module for table `name` (its __init__ hides them behind `import *`)."""
    try:
        return importlib.import_module(f"tflite.{name}")
    except ImportError:
        raise IRConvertError("export tflite needs the 'tflite' and 'flatbuffers' packages: "
                             "pip install 'irconvert[lce]'") from None


def _ints(b, values) -> int:
    b.StartVector(4, len(values), 4)
    for v in reversed(list(values)):
        b.PrependInt32(int(v))
    return b.EndVector()


def _offsets(b, offsets) -> int:
    b.StartVector(4, len(offsets), 4)
    for o in reversed(offsets):
        b.PrependUOffsetTRelative(o)
    return b.EndVector()


_BUILTIN = {"ADD": 0, "AVERAGE_POOL_2D": 1, "CONV_2D": 3, "DEPTHWISE_CONV_2D": 4, "FULLY_CONNECTED": 9,
            "MAX_POOL_2D": 17, "MUL": 18, "RELU": 19, "RELU_N1_TO_1": 20, "RELU6": 21, "RESHAPE": 22,
            "CUSTOM": 32, "PAD": 34, "TRANSPOSE": 39, "MEAN": 40, "SUB": 41, "MAXIMUM": 55, "MINIMUM": 57,
            "DIV": 42, "PRELU": 54, "PADV2": 60, "SLICE": 65, "TILE": 69, "LOGISTIC": 14, "HARD_SWISH": 117}


def _options(table: str, union: int, **fields):
    """(BuiltinOptions union type, builder function) for options table `table` with `fields` set."""
    def build(b):
        mod = _schema(table)
        getattr(mod, f"{table}Start")(b)
        for key, value in fields.items():
            getattr(mod, f"{table}Add{key}")(b, value)
        return getattr(mod, f"{table}End")(b)
    return union, build




def _opt(table: str, **fields):
    return _options(table, _union(table), **fields)


def _union(table: str) -> int:
    return getattr(_schema("BuiltinOptions").BuiltinOptions, table)


class _Converter:
    """Walks the traced model in graph order and emits each node's ops (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule, values: dict):
        self.gm, self.values, self.fb = gm, values, _Flat()
        self.modules = dict(gm.named_modules())
        self.float: dict[fx.Node, int] = {}  # value -> its float tensor (NHWC for images)
        self.bits: dict[tuple, int] = {}  # (value, threshold key) -> its bitpacked tensor
        self.skip: set[fx.Node] = set()  # nodes folded into an op emitted earlier
        self.inputs: list[int] = []

    # --- the walk ---------------------------------------------------------------------------------
    def convert(self) -> bytes:
        outputs = []
        for node in self.gm.graph.nodes:
            if node in self.skip:
                continue
            if node.op == "placeholder":
                if node.users:
                    if self.inputs:
                        raise IRConvertError(f"export tflite: the model takes more than one input ({node.name})")
                    self.inputs.append(self._new(node, "input"))
                    self.float[node] = self.inputs[0]
            elif node.op == "output":
                out = node.args[0]
                if not isinstance(out, fx.Node) or out not in self.float:
                    raise IRConvertError("export tflite: the model must return one tensor (not a tuple or dict)")
                outputs.append(self.float[out])
            elif node.op == "call_module":
                self._module(node, self.modules[node.target])
            elif node.op in ("call_function", "call_method"):
                self._function(node)
            # get_attr: a constant, created where an op reads it
        return self.fb.serialize(self.inputs, outputs)

    def _shape(self, node: fx.Node) -> tuple[int, ...]:
        """The TFLite shape of `node`'s value: NHWC for a 4-D image tensor."""
        shape = tuple(self.values[node].shape)
        return (shape[0], shape[2], shape[3], shape[1]) if len(shape) == 4 else shape

    def _new(self, node: fx.Node, name: str = "") -> int:
        return self.fb.tensor(self._shape(node), name=name or node.name)

    def _in(self, node: fx.Node, arg) -> int:
        if not isinstance(arg, fx.Node) or arg not in self.float:
            raise IRConvertError(f"export tflite: {_what(self, node)} reads a value the exporter does not hold "
                                 f"({arg}); this graph is not supported")
        return self.float[arg]

    def _emit(self, node: fx.Node, code: str, inputs: list[int], options=None) -> int:
        out = self._new(node)
        self.fb.op(_BUILTIN[code], inputs, [out], options)
        self.float[node] = out
        return out

    # --- modules ----------------------------------------------------------------------------------
    def _module(self, node: fx.Node, m: nn.Module) -> None:
        x = node.args[0] if node.args else None
        if isinstance(m, BinaryMixin):
            return self._binary(node, m)
        if isinstance(m, nn.Conv2d) and type(m) is nn.Conv2d:
            return self._float_conv(node, m, m.weight.detach(), m.bias)
        if type(m) is nn.Linear or _TimmLinear is not None and type(m) is _TimmLinear:  # timm's: F.linear in eval
            return self._float_linear(node, m.weight.detach(), m.bias, self._in(node, x))
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or (BatchNormAct2d and isinstance(m, BatchNormAct2d)):
            return self._batchnorm(node, m, self._in(node, x))
        if isinstance(m, (nn.Identity, nn.Dropout, nn.Flatten)):
            if isinstance(m, nn.Dropout) and m.training:
                raise IRConvertError(f"export tflite: {node.target} is a Dropout in training mode; call model.eval()")
            return self._reshape(node, x) if isinstance(m, nn.Flatten) else self._alias(node, x)
        if isinstance(m, nn.MaxPool2d):
            return self._maxpool(node, m, x)
        if isinstance(m, nn.AvgPool2d):
            return self._avgpool(node, m, x)
        if isinstance(m, nn.AdaptiveAvgPool2d):
            if tuple(self.values[node].shape[2:]) != (1, 1):
                raise IRConvertError(f"export tflite: {node.target} pools to {m.output_size}; only global pooling (1) exports")
            return self._mean(node, x, (1, 2))
        if self._activation(node, m, self._in(node, x)):
            return
        raise IRConvertError(f"export tflite: layer {node.target} ({type(m).__name__}) has no TFLite/LCE form in "
                             "irconvert's exporter (see docs/deployment.md for what exports)")

    def _alias(self, node: fx.Node, x) -> None:
        self.float[node] = self._in(node, x)

    def _activation(self, node: fx.Node, m: nn.Module, x: int) -> bool:
        """Emit activation module `m` on tensor `x`; False if `m` is not one the exporter knows."""
        if isinstance(m, nn.ReLU6):
            self._emit(node, "RELU6", [x])
        elif isinstance(m, nn.Hardtanh):
            self._clamp(node, x, float(m.min_val), float(m.max_val))
        elif isinstance(m, nn.ReLU):
            self._emit(node, "RELU", [x])
        elif isinstance(m, RPReLU):
            c = self._shape(node)[-1]
            flat = lambda p: p.detach().float().reshape(-1).expand(c).numpy()  # noqa: E731
            y = self.fb.tensor(self._shape(node))
            self.fb.op(_BUILTIN["SUB"], [x, self.fb.const(flat(m.gamma))], [y], _opt("SubOptions"))
            z = self.fb.tensor(self._shape(node))
            alpha = flat(m.beta).reshape((1,) * (len(self._shape(node)) - 1) + (c,))
            self.fb.op(_BUILTIN["PRELU"], [y, self.fb.const(alpha)], [z])
            self._emit(node, "ADD", [z, self.fb.const(flat(m.zeta))], _opt("AddOptions"))
        elif isinstance(m, (nn.Identity, nn.Dropout)):
            self.float[node] = x
        else:
            kind = next((k for k, types in _GATE_ACTS.items() if isinstance(m, types)), None)
            if kind is None:
                return False
            self._smooth(node, kind, x)
        return True

    def _smooth(self, node: fx.Node, kind: str, x: int) -> None:
        """SiLU as x * LOGISTIC(x), Sigmoid as LOGISTIC, Hardswish as HARD_SWISH, Hardsigmoid as
        min(max(x + 3, 0), 6) / 6 in PyTorch's order (ADD, RELU6, DIV): squeeze-excitation and its blocks."""
        if kind == "sigmoid":
            self._emit(node, "LOGISTIC", [x])
        elif kind == "silu":
            y = self.fb.tensor(self._shape(node))
            self.fb.op(_BUILTIN["LOGISTIC"], [x], [y])
            self._emit(node, "MUL", [x, y], _opt("MulOptions"))
        elif kind == "hardswish":
            self._emit(node, "HARD_SWISH", [x])
        else:
            y, z = self.fb.tensor(self._shape(node)), self.fb.tensor(self._shape(node))
            self.fb.op(_BUILTIN["ADD"], [x, self.fb.const(np.float32([3.0]))], [y], _opt("AddOptions"))
            self.fb.op(_BUILTIN["RELU6"], [y], [z])
            self._emit(node, "DIV", [z, self.fb.const(np.float32([6.0]))], _opt("DivOptions"))

    def _clamp(self, node: fx.Node, x: int, lo: float, hi: float) -> None:
        if (lo, hi) == (-1.0, 1.0):
            self._emit(node, "RELU_N1_TO_1", [x])
        elif (lo, hi) == (0.0, 6.0):
            self._emit(node, "RELU6", [x])
        else:
            y = self.fb.tensor(self._shape(node))
            self.fb.op(_BUILTIN["MAXIMUM"], [x, self.fb.const(np.float32([lo]))], [y])
            self._emit(node, "MINIMUM", [y, self.fb.const(np.float32([hi]))])

    def _batchnorm(self, node: fx.Node, m: nn.Module, x: int) -> None:
        """An unfused BatchNorm: MUL + ADD per channel (BatchNormAct2d: then its activation; Bi-Real: + S(x))."""
        alpha, beta = _bn_affine(m, node)
        y = self.fb.tensor(self._shape(node))
        self.fb.op(_BUILTIN["MUL"], [x, self.fb.const(alpha)], [y], _opt("MulOptions"))
        out = self.fb.tensor(self._shape(node))
        self.fb.op(_BUILTIN["ADD"], [y, self.fb.const(beta)], [out], _opt("AddOptions"))
        self.float[node] = out
        self._after_bn(node, m, out)

    def _after_bn(self, node: fx.Node, m: nn.Module, y: int) -> None:
        """What a BatchNorm module adds after its affine, in its forward's order: timm's fused activation
        (BatchNormAct2d), then the Bi-Real shortcut (ShortcutMixin adds S(x) to the module's whole output)."""
        if BatchNormAct2d is not None and isinstance(m, BatchNormAct2d):
            if not (isinstance(m.drop, nn.Identity) or isinstance(m.drop, nn.Dropout)):
                raise IRConvertError(f"export tflite: {node.target} ({type(m.drop).__name__} inside) is not supported")
            if not self._activation(node, m.act, self.float[node]):
                raise IRConvertError(f"export tflite: layer {node.target}.act ({type(m.act).__name__}) has no "
                                     "TFLite/LCE form in irconvert's exporter")
        if isinstance(m, ShortcutMixin):
            conv_node = node.args[0]
            conv = m.bireal_conv
            if not (isinstance(conv_node, fx.Node) and conv_node.op == "call_module"
                    and self.modules[conv_node.target] is conv):
                raise IRConvertError(f"export tflite: the Bi-Real shortcut of {node.target} does not follow its conv")
            y = self.float[node]
            s = self._bireal_shortcut(node, conv_node, conv)
            gate = m._parameters.get("shortcut_gate")
            if gate is not None:
                g = self.fb.tensor(self._shape(node))
                self.fb.op(_BUILTIN["MUL"], [s, self.fb.const(gate.detach().float().numpy())], [g], _opt("MulOptions"))
                s = g
            self._emit(node, "ADD", [y, s], _opt("AddOptions"))

    def _bireal_shortcut(self, node: fx.Node, conv_node: fx.Node, conv: nn.Module) -> int:
        """S(x) of shortcut.bireal_shortcut as TFLite ops, in its order: the stride's pool, the centred crop
        (SLICE) or zero pad (PAD) to the conv's output size, then the channels: TILE (+ SLICE) to widen, to
        shrink SLICE each group of C_out channels (the last zero-padded), ADD them left to right, DIV by n_o."""
        x_node = conv_node.args[0]
        x = self._in(node, x_node)
        n, h, w, c = self._shape(x_node)
        _, ho, wo, cout = self._shape(node)
        if cout != conv.out_channels:
            raise IRConvertError(f"export tflite: the Bi-Real shortcut of {conv_node.target} does not give the conv's "
                                 f"output shape {self._shape(node)}")
        stride = _pair(conv.stride)
        if stride != (1, 1):
            x, h, w = self._shortcut_pool(x, (n, h, w, c), stride)
        dh, dw = ho - h, wo - w
        if dh < 0 or dw < 0:  # remove (-d) // 2 before, the rest after
            size = (n, min(h, ho), min(w, wo), c)
            begin = (0, (-dh) // 2 if dh < 0 else 0, (-dw) // 2 if dw < 0 else 0, 0)
            x = self._slice(x, begin, size)
            h, w = size[1], size[2]
        if dh > 0 or dw > 0:  # d // 2 zeros before, the rest after
            spec = [[0, 0], [max(dh, 0) // 2, max(dh, 0) - max(dh, 0) // 2],
                    [max(dw, 0) // 2, max(dw, 0) - max(dw, 0) // 2], [0, 0]]
            y = self.fb.tensor((n, ho, wo, c))
            self.fb.op(_BUILTIN["PAD"], [x, self.fb.const(np.int32(spec))], [y], _opt("PadOptions"))
            x, h, w = y, ho, wo
        if cout > c:  # channel o = channel o mod C_in
            reps = -(-cout // c)
            y = self.fb.tensor((n, h, w, c * reps))
            self.fb.op(_BUILTIN["TILE"], [x, self.fb.const(np.int32([1, 1, 1, reps]))], [y])
            x = y if c * reps == cout else self._slice(y, (0, 0, 0, 0), (n, h, w, cout))
        elif cout < c:  # channel o = (x[o] + x[o + C_out] + ...) / n_o, summed left to right as PyTorch does
            total = None
            for start in range(0, c, cout):
                k = min(cout, c - start)
                part = self._slice(x, (0, 0, 0, start), (n, h, w, k))
                if k < cout:  # the last, partial group: + 0 leaves the other channels' sums as they are
                    y = self.fb.tensor((n, h, w, cout))
                    spec = np.int32([[0, 0], [0, 0], [0, 0], [0, cout - k]])
                    self.fb.op(_BUILTIN["PAD"], [part, self.fb.const(spec)], [y], _opt("PadOptions"))
                    part = y
                if total is None:
                    total = part
                else:
                    y = self.fb.tensor((n, h, w, cout))
                    self.fb.op(_BUILTIN["ADD"], [total, part], [y], _opt("AddOptions"))
                    total = y
            counts = np.full(cout, c // cout, np.float32)
            counts[:c % cout] += 1
            x = self.fb.tensor((n, h, w, cout))
            self.fb.op(_BUILTIN["DIV"], [total, self.fb.const(counts)], [x], _opt("DivOptions"))
        if (n, h, w, cout) != self._shape(node):
            raise IRConvertError(f"export tflite: the Bi-Real shortcut of {conv_node.target} does not give the conv's "
                                 f"output shape {self._shape(node)}")
        return x

    def _shortcut_pool(self, x: int, shape, stride) -> tuple[int, int, int]:
        """(tensor, h, w) of PyTorch's avg_pool2d(x, s, s, ceil_mode=True, count_include_pad=False): TF's SAME
        where it pads nothing before (the pad stride * out - size <= 1 per axis: its windows are PyTorch's,
        valid pixels counted); else PAD zeros after, VALID (sum / (sh * sw)) and MUL by sh * sw / valid count."""
        n, h, w, c = shape
        (sh, sw), ho, wo = stride, -(-h // stride[0]), -(-w // stride[1])
        pool = dict(StrideW=sw, StrideH=sh, FilterWidth=sw, FilterHeight=sh)
        y = self.fb.tensor((n, ho, wo, c))
        if ho * sh - h <= 1 and wo * sw - w <= 1:
            self.fb.op(_BUILTIN["AVERAGE_POOL_2D"], [x], [y], _opt("Pool2DOptions", Padding=_SAME, **pool))
            return y, ho, wo
        padded = self.fb.tensor((n, ho * sh, wo * sw, c))
        spec = np.int32([[0, 0], [0, ho * sh - h], [0, wo * sw - w], [0, 0]])
        self.fb.op(_BUILTIN["PAD"], [x, self.fb.const(spec)], [padded], _opt("PadOptions"))
        self.fb.op(_BUILTIN["AVERAGE_POOL_2D"], [padded], [y], _opt("Pool2DOptions", Padding=_VALID, **pool))
        rows = np.minimum(np.arange(ho) * sh + sh, h) - np.arange(ho) * sh
        cols = np.minimum(np.arange(wo) * sw + sw, w) - np.arange(wo) * sw
        scale = (sh * sw / (rows[:, None] * cols[None, :])).astype(np.float32).reshape(1, ho, wo, 1)
        z = self.fb.tensor((n, ho, wo, c))
        self.fb.op(_BUILTIN["MUL"], [y, self.fb.const(scale)], [z], _opt("MulOptions"))
        return z, ho, wo

    def _slice(self, x: int, begin, size) -> int:
        y = self.fb.tensor(size)
        self.fb.op(_BUILTIN["SLICE"], [x, self.fb.const(np.int32(begin)), self.fb.const(np.int32(size))], [y],
                   _opt("SliceOptions"))
        return y

    def _maxpool(self, node: fx.Node, m: nn.MaxPool2d, x_node) -> None:
        if m.ceil_mode or m.return_indices or _pair(m.dilation) != (1, 1):
            raise IRConvertError(f"export tflite: {node.target} (MaxPool2d with ceil_mode, indices or dilation) is not supported")
        k, s = _pair(m.kernel_size), _pair(m.stride or m.kernel_size)
        x, padding = self._pad(node, x_node, k, s, (1, 1), _pair(m.padding), -np.inf)
        self._emit(node, "MAX_POOL_2D", [x], _opt("Pool2DOptions", Padding=padding, StrideW=s[1], StrideH=s[0],
                                                  FilterWidth=k[1], FilterHeight=k[0]))

    def _avgpool(self, node: fx.Node, m: nn.AvgPool2d, x_node) -> None:
        k, s = _pair(m.kernel_size), _pair(m.stride or m.kernel_size)
        if _pair(m.padding) != (0, 0) or m.ceil_mode or m.divisor_override:
            raise IRConvertError(f"export tflite: {node.target} (AvgPool2d with padding or ceil_mode) is not supported")
        self._emit(node, "AVERAGE_POOL_2D", [self._in(node, x_node)],
                   _opt("Pool2DOptions", Padding=_VALID, StrideW=s[1], StrideH=s[0], FilterWidth=k[1], FilterHeight=k[0]))

    def _mean(self, node: fx.Node, x_node, axes: tuple[int, ...]) -> None:
        keep = len(self.values[node].shape) == len(self.values[x_node].shape)
        self._emit(node, "MEAN", [self._in(node, x_node), self.fb.const(np.int32(axes))],
                   _opt("ReducerOptions", KeepDims=keep))

    def _pad(self, node: fx.Node, x_node, k, s, d, pads, value: float) -> tuple[int, int]:
        """(tensor, padding) computing PyTorch's symmetric `pads` of x: SAME where TF's SAME pads the same,
        else PAD (or PADV2 with `value`) then VALID."""
        x = self._in(node, x_node)
        n, h, w, c = self._shape(x_node)
        if pads == (0, 0):
            return x, _VALID
        if _same_matches((h, w), k, s, d, pads):
            return x, _SAME
        y = self.fb.tensor((n, h + 2 * pads[0], w + 2 * pads[1], c))
        spec = self.fb.const(np.int32([[0, 0], [pads[0], pads[0]], [pads[1], pads[1]], [0, 0]]))
        if value == 0:
            self.fb.op(_BUILTIN["PAD"], [x, spec], [y], _opt("PadOptions"))
        else:
            self.fb.op(_BUILTIN["PADV2"], [x, spec, self.fb.const(np.float32([value]))], [y], _opt("PadV2Options"))
        return y, _VALID

    # --- float layers -----------------------------------------------------------------------------
    def _fold_bn(self, node: fx.Node) -> Optional[fx.Node]:
        """The BatchNorm node right after `node` that folds into it (its only user, a plain eval BatchNorm)."""
        if len(node.users) != 1:
            return None
        u = next(iter(node.users))
        m = self.modules.get(u.target) if u.op == "call_module" else None
        if m is None or u.args[0] is not node or not isinstance(m, nn.modules.batchnorm._BatchNorm) or m.training:
            return None
        return u

    def _float_conv(self, node: fx.Node, m: nn.Conv2d, weight: torch.Tensor, bias, x_node=None) -> None:
        if m.padding_mode != "zeros" or isinstance(m.padding, str) and m.padding != "valid":
            raise IRConvertError(f"export tflite: {node.target} pads with {m.padding_mode!r}/{m.padding!r}; "
                                 "only zero padding by numbers exports")
        x_node = node.args[0] if x_node is None else x_node
        w, b = weight.float(), (bias.detach().float() if bias is not None else torch.zeros(weight.shape[0]))
        out_node = node
        bn = self._fold_bn(node)
        if bn is not None and not isinstance(self.modules[bn.target], ShortcutMixin):
            alpha, beta = _bn_affine(self.modules[bn.target], bn)
            w = w * torch.from_numpy(alpha).reshape(-1, 1, 1, 1)
            b = b * torch.from_numpy(alpha) + torch.from_numpy(beta)
            out_node = bn
            self.skip.add(bn)
        k, s, d = _pair(m.kernel_size), _pair(m.stride), _pair(m.dilation)
        pads = (0, 0) if m.padding == "valid" else _pair(m.padding)
        x, padding = self._pad(node, x_node, k, s, d, pads, 0.0)
        cin = w.shape[1] * m.groups
        if m.groups == 1:
            filt = self.fb.const(w.permute(0, 2, 3, 1).numpy())
            opts = _opt("Conv2DOptions", Padding=padding, StrideW=s[1], StrideH=s[0],
                        DilationWFactor=d[1], DilationHFactor=d[0])
            code = "CONV_2D"
        elif m.groups == cin and w.shape[0] % cin == 0:
            filt = self.fb.const(w.permute(1, 2, 3, 0).numpy())
            opts = _opt("DepthwiseConv2DOptions", Padding=padding, StrideW=s[1], StrideH=s[0],
                        DepthMultiplier=w.shape[0] // cin, DilationWFactor=d[1], DilationHFactor=d[0])
            code = "DEPTHWISE_CONV_2D"
        else:
            raise IRConvertError(f"export tflite: {node.target} is a grouped conv ({m.groups} groups, not depthwise); "
                                 "not supported")
        out = self._emit(out_node, code, [x, filt, self.fb.const(b.numpy())], opts)
        if out_node is not node:
            self.float[node] = out  # not read again: the BatchNorm was its only user
            self._after_bn(out_node, self.modules[out_node.target], out)

    def _float_linear(self, node: fx.Node, weight: torch.Tensor, bias, x: int) -> None:
        if len(self.values[node].shape) != 2:
            raise IRConvertError(f"export tflite: {node.target} is a Linear on a {self.values[node].dim()}-D tensor; "
                                 "only [N, features] exports")
        b = bias.detach().float() if bias is not None else torch.zeros(weight.shape[0])
        self._emit(node, "FULLY_CONNECTED", [x, self.fb.const(weight.float().numpy()), self.fb.const(b.numpy())],
                   _opt("FullyConnectedOptions"))

    # --- binary layers ----------------------------------------------------------------------------
    def _binary(self, node: fx.Node, m: BinaryMixin) -> None:
        if not m.binary_frozen:
            raise IRConvertError(f"export tflite: {node.target} is not a deployment layer (export a packed file)")
        if len(node.args) != 1 or node.kwargs:
            raise IRConvertError(f"export tflite: {node.target} is called with extra arguments; not supported")
        w = m._parameters["weight"].detach().float()
        if m.binary_mode == "W1A32":
            if m.binary.clip:  # made W1A32 after swap.fuse_hardtanh moved the Hardtanh in front into the layer
                raise IRConvertError(f"export tflite: {node.target} is W1A32 with the Hardtanh in front fused into it; "
                                     "export the packed file instead (load_packed keeps the Hardtanh)")
            return self._w1a32(node, m, w)
        linear = self._check_binary(node, m)
        signs, scale, bias, k, s, d, pads = _binary_params(m, w, linear)
        cin = signs.shape[1]
        tau = getattr(m, "input_threshold", None)
        x_bits = self._packed(node, node.args[0], tau, linear)
        n, h, wd = self._bits_shape(node.args[0], linear)

        # the ops after it that fold in: a BatchNorm; with no padding, a chain read only as signs
        end, mult, add = node, scale.clone(), bias.clone()
        bn = self._fold_bn(node)
        bn_m = self.modules[bn.target] if bn is not None else None
        if bn is not None:
            alpha, beta = (torch.from_numpy(v) for v in _bn_affine(bn_m, bn))
            mult, add = alpha * scale, alpha * bias + beta
            end = bn
            self.skip.add(bn)
        chain = None
        if pads == (0, 0) and not isinstance(bn_m, ShortcutMixin):
            chain = self._sign_chain(node, end, linear)
        flip, thr = torch.zeros(signs.shape[0], dtype=torch.bool), None
        if chain is not None:
            thr, flip = _thresholds(m, scale, bias, chain[1], chain[2], cin * k[0] * k[1])
            if thr is None:
                chain = None
        signs = torch.where(flip.reshape(-1, 1, 1, 1), -signs, signs)
        cout, filt = signs.shape[0], _lce_filter(signs)
        ho, wo = self.values[node].shape[-2:] if not linear else (1, 1)
        opts = dict(channels_in=cin, dilation_height_factor=d[0], dilation_width_factor=d[1],
                    fused_activation_function=0, pad_values=0, padding=_VALID, stride_height=s[0], stride_width=s[1])
        if chain is not None:  # bitpacked output, read by the next binary layers as it is
            return self._bconv_bits(node, x_bits, filt, thr, chain, opts, (n, ho, wo, cout))
        h_in, w_in = (1, 1) if linear else (h, wd)
        x_bits, correction = self._bconv_padding(node, x_bits, opts, (n, h_in, w_in), pads, k, s, d, signs, mult)
        out_shape = (n, ho, wo, cout)
        y = self.fb.tensor(out_shape)
        self.fb.op("LceBconv2d", [x_bits, self.fb.const(filt), self.fb.const(mult.numpy()),
                                  self.fb.const(add.numpy()), -1], [y], custom=opts)
        if correction is not None:
            z = self.fb.tensor(out_shape)
            self.fb.op(_BUILTIN["ADD"], [y, correction], [z], _opt("AddOptions"))
            y = z
        if linear:
            z = self.fb.tensor(self._shape(node))
            self.fb.op(_BUILTIN["RESHAPE"], [y, self.fb.const(np.int32(self._shape(node)))], [z])
            y = z
        self.float[node] = y
        if end is not node:
            self.float[end] = y
            self._after_bn(end, bn_m, y)

    def _check_binary(self, node: fx.Node, m: nn.Module) -> bool:
        """True for a binary Linear, False for a conv; IRConvertError for a binary layer LCE cannot run."""
        linear = isinstance(m, nn.Linear)
        if not linear and (type(m).__mro__[2] is not nn.Conv2d or m.padding_mode != "zeros" or isinstance(m.padding, str)):
            raise IRConvertError(f"export tflite: {node.target} ({type(m).__mro__[2].__name__}, padding "
                                 f"{getattr(m, 'padding', None)!r}) is not a binary conv the exporter supports")
        if not linear and m.groups != 1:
            raise IRConvertError(f"export tflite: {node.target} is a grouped binary conv ({m.groups} groups); "
                                 "LCE's groups need 32-channel words per group: not supported")
        if linear and len(self.values[node].shape) != 2:
            raise IRConvertError(f"export tflite: {node.target} is a binary Linear on a {self.values[node].dim()}-D "
                                 "tensor; only [N, features] exports")
        return linear

    def _bconv_bits(self, node, x_bits, filt, thr, chain, opts, shape) -> None:
        """LceBconv2d with bitpacked output by integer thresholds, the bits of the chain's last value."""
        n, ho, wo, cout = shape
        out = self.fb.tensor((n, ho, wo, _words(cout)), _I32, name=f"{node.name}_bits")
        # dummy multiplier and bias: LCE's reference kernel crashes on index -1 there (lce-format.md)
        self.fb.op("LceBconv2d", [x_bits, self.fb.const(filt), self.fb.const(np.ones(cout, np.float32)),
                                  self.fb.const(np.zeros(cout, np.float32)), self.fb.const(thr.numpy())], [out],
                   custom=opts)
        self.bits[(chain[0], _tau_key(chain[2]))] = out
        self.skip.update(chain[3])

    def _bconv_padding(self, node, x_bits, opts, nhw, pads, k, s, d, signs, mult):
        """(input bits, correction tensor or None) for PyTorch's zero padding: LCE's SAME zero padding where it
        matches, else PAD of the bits and the border correction (module docstring); sets opts['padding']."""
        n, h_in, w_in = nhw
        cin = signs.shape[1]
        correction = None
        if pads != (0, 0):
            eff = [dd * (kk - 1) + 1 for kk, dd in zip(k, d)]
            # LCE's optimized kernels correct the padding per side and get an input smaller than the
            # filter wrong (both sides at once: 0.7 off at 2x2, measured); the reference kernel needs even C_in
            if _same_matches((h_in, w_in), k, s, d, pads) and cin % 2 == 0 and h_in >= eff[0] and w_in >= eff[1]:
                opts["padding"] = _SAME  # LCE's exact zero padding: TF's SAME pads as PyTorch does here
            else:
                padded = self.fb.tensor((n, h_in + 2 * pads[0], w_in + 2 * pads[1], _words(cin)), _I32)
                spec = self.fb.const(np.int32([[0, 0], [pads[0], pads[0]], [pads[1], pads[1]], [0, 0]]))
                self.fb.op(_BUILTIN["PAD"], [x_bits, spec], [padded], _opt("PadOptions"))
                x_bits = padded
                correction = self._pad_correction(node, signs, mult, (h_in, w_in), pads, k, s, d)
        return x_bits, correction

    def _w1a32(self, node: fx.Node, m: nn.Module, w: torch.Tensor) -> None:
        """A W1A32 layer: its signs stored as bits, LceDequantize'd to a float +-1 filter in the graph, a float
        CONV_2D / FULLY_CONNECTED with it, then MUL by the scale and ADD the bias (a BatchNorm after it folded in)."""
        linear = isinstance(m, nn.Linear)
        if not linear and (type(m).__mro__[2] is not nn.Conv2d or m.groups != 1 or isinstance(m.padding, str)
                           or m.padding_mode != "zeros"):
            raise IRConvertError(f"export tflite: {node.target} (W1A32 {type(m).__mro__[2].__name__}, groups "
                                 f"{getattr(m, 'groups', 1)}) is not a layer the exporter supports")
        if linear and len(self.values[node].shape) != 2:
            raise IRConvertError(f"export tflite: {node.target} is a Linear on a {self.values[node].dim()}-D tensor; "
                                 "only [N, features] exports")
        w4 = w.reshape(w.shape[0], -1, 1, 1) if linear else w
        signs = torch.where(w4 >= 0, 1.0, -1.0)
        scale = w4.abs().reshape(w4.shape[0], -1)[:, 0]
        bias = m.bias.detach().float() if m.bias is not None else torch.zeros(w.shape[0])
        out_node, mult, add = node, scale, bias
        bn = self._fold_bn(node)
        if bn is not None:
            alpha, beta = (torch.from_numpy(v) for v in _bn_affine(self.modules[bn.target], bn))
            out_node, mult, add = bn, alpha * scale, alpha * bias + beta
            self.skip.add(bn)
        o, cin, kh, kw = signs.shape
        bits = self.fb.const(_lce_filter(signs).reshape((o, cin and _words(cin)) if linear else (o, kh, kw, _words(cin))))
        filt = self.fb.tensor((o, cin) if linear else (o, kh, kw, cin))
        self.fb.op("LceDequantize", [bits], [filt], custom={})
        zeros = self.fb.const(np.zeros(o, np.float32))
        y = self.fb.tensor(self._shape(node))
        if linear:
            self.fb.op(_BUILTIN["FULLY_CONNECTED"], [self._in(node, node.args[0]), filt, zeros], [y],
                       _opt("FullyConnectedOptions"))
        else:
            k, s, d = _pair(m.kernel_size), _pair(m.stride), _pair(m.dilation)
            x, padding = self._pad(node, node.args[0], k, s, d, _pair(m.padding), 0.0)
            self.fb.op(_BUILTIN["CONV_2D"], [x, filt, zeros], [y],
                       _opt("Conv2DOptions", Padding=padding, StrideW=s[1], StrideH=s[0],
                            DilationWFactor=d[1], DilationHFactor=d[0]))
        z = self.fb.tensor(self._shape(node))
        self.fb.op(_BUILTIN["MUL"], [y, self.fb.const(mult.numpy())], [z], _opt("MulOptions"))
        out = self._emit(out_node, "ADD", [z, self.fb.const(add.numpy())], _opt("AddOptions"))
        self.float[node] = out
        if out_node is not node:
            self._after_bn(out_node, self.modules[out_node.target], out)

    def _bits_shape(self, x_node: fx.Node, linear: bool) -> tuple[int, int, int]:
        shape = self._shape(x_node)
        return (shape[0], 1, 1) if linear else shape[:3]

    def _packed(self, node: fx.Node, x_node, tau: Optional[torch.Tensor], linear: bool) -> int:
        """The bitpacked tensor of sign(x - tau): from a bitpacked producer, or SUB + LceQuantize (once per value)."""
        key = (x_node, _tau_key(tau))
        if key in self.bits:
            return self.bits[key]
        x = self._in(node, x_node)
        shape = self._shape(x_node)
        c = shape[-1]
        if tau is not None:
            y = self.fb.tensor(shape)
            self.fb.op(_BUILTIN["SUB"], [x, self.fb.const(tau.float().numpy())], [y], _opt("SubOptions"))
            x = y
        if linear:
            y = self.fb.tensor((shape[0], 1, 1, c))
            self.fb.op(_BUILTIN["RESHAPE"], [x, self.fb.const(np.int32([shape[0], 1, 1, c]))], [y])
            x = y
        n, h, w = self._bits_shape(x_node, linear)
        out = self.fb.tensor((n, h, w, _words(c)), _I32, name=f"{x_node.name}_bits")
        self.fb.op("LceQuantize", [x], [out], custom={})
        self.bits[key] = out
        return out

    def _sign_chain(self, node: fx.Node, end: fx.Node, linear: bool):
        """(last value, chain modules, tau) where every reader of the chain's last value is a W1A1 layer that
        only needs its sign, with one threshold; the chain being per-channel ops with one user each; else None."""
        modules, nodes, cur = [], [], end
        if end is not node:
            modules.append(self.modules[end.target])
        while True:
            users = list(cur.users)
            readers = [self.modules.get(u.target) if u.op == "call_module" else None for u in users]
            if users and all(isinstance(r, BinaryMixin) and r.binary_frozen and r.binary_mode == "W1A1"
                             and not r.bireal_keep_input and u.args and u.args[0] is cur and len(u.args) == 1
                             and isinstance(r, nn.Linear) == linear and (linear or r.groups == 1)
                             for u, r in zip(users, readers)):
                taus = [getattr(r, "input_threshold", None) for r in readers]
                if all(_tau_key(t) == _tau_key(taus[0]) for t in taus):
                    return cur, modules, taus[0], nodes
                return None
            if len(users) != 1 or users[0].op != "call_module":
                return None
            m = readers[0]
            if not isinstance(m, (nn.Hardtanh, nn.ReLU, RPReLU, nn.Identity, nn.Dropout)) or users[0].args[0] is not cur:
                return None
            modules.append(m)
            nodes.append(users[0])
            cur = users[0]

    def _pad_correction(self, node, signs, mult, hw, pads, k, s, d) -> int:
        """The tensor -m[o] * (sum of the weights on padded taps) at every output position: a CONV_2D of a
        constant mask of the padded border with the filter -m[o] * sum_c B[o, c, i, j]."""
        h, w = hw
        mask = np.ones((1, h + 2 * pads[0], w + 2 * pads[1], 1), np.float32)
        mask[:, pads[0]:pads[0] + h, pads[1]:pads[1] + w, :] = 0
        filt = (-mult.reshape(-1, 1, 1) * signs.sum(1)).unsqueeze(-1).numpy()  # [O, kh, kw, 1]
        out = self.fb.tensor(self._shape(node))
        self.fb.op(_BUILTIN["CONV_2D"], [self.fb.const(mask), self.fb.const(filt),
                                         self.fb.const(np.zeros(signs.shape[0], np.float32))], [out],
                   _opt("Conv2DOptions", Padding=_VALID, StrideW=s[1], StrideH=s[0],
                        DilationWFactor=d[1], DilationHFactor=d[0]))
        return out

    # --- functions and methods ---------------------------------------------------------------------
    def _arith(self, node: fx.Node, op: str, broadcast: bool) -> bool:
        """`op` (ADD or MUL) of two tensors (of one shape unless `broadcast`) or of a tensor and a Python number;
        False for anything else."""
        a, b = node.args[0], node.args[1]
        options = _opt("AddOptions" if op == "ADD" else "MulOptions")
        if isinstance(a, fx.Node) and isinstance(b, fx.Node):
            if not broadcast and self.values[a].shape != self.values[b].shape:
                raise IRConvertError(f"export tflite: {node.name} adds tensors of shapes "
                                     f"{tuple(self.values[a].shape)} and {tuple(self.values[b].shape)}; not supported")
            self._emit(node, op, [self._in(node, a), self._in(node, b)], options)
            return True
        tensor, scalar = (a, b) if isinstance(a, fx.Node) else (b, a)
        if isinstance(scalar, (int, float)):
            self._emit(node, op, [self._in(node, tensor), self.fb.const(np.float32([scalar]))], options)
            return True
        return False

    def _function(self, node: fx.Node) -> None:
        t, args = node.target, node.args
        val = self.values.get(node)
        if not isinstance(val, torch.Tensor):
            return  # sizes and other Python values: used at trace time only
        if (t in _ADDS or t == "add" or t == "add_") and self._arith(node, "ADD", broadcast=False):
            return
        if t in _MULS and self._arith(node, "MUL", broadcast=True):  # a gate's product: [N, 1, 1, C] broadcasts
            return
        kind = _GATE_FUNCS.get(t)
        if kind is not None:
            return self._smooth(node, kind, self._in(node, args[0]))
        if t in (torch.flatten, "flatten", "view", "reshape", torch.reshape):
            return self._reshape(node, args[0])
        if t in (F.relu, torch.relu, "relu"):
            return self._emit(node, "RELU", [self._in(node, args[0])]) and None
        if t in (F.relu6,):
            return self._emit(node, "RELU6", [self._in(node, args[0])]) and None
        if t in (F.hardtanh, "clamp", torch.clamp) and t is not None:
            lo = node.kwargs.get("min_val", node.kwargs.get("min", args[1] if len(args) > 1 else -1.0))
            hi = node.kwargs.get("max_val", node.kwargs.get("max", args[2] if len(args) > 2 else 1.0))
            return self._clamp(node, self._in(node, args[0]), float(lo), float(hi))
        if t in (F.dropout, "contiguous"):
            return self._alias(node, args[0])
        if getattr(t, "__name__", None) == "stochastic_depth":  # torchvision's: the identity in eval mode
            training = node.kwargs.get("training", args[3] if len(args) > 3 else True)
            if not training:
                return self._alias(node, args[0])
            raise IRConvertError(f"export tflite: {node.name} is stochastic depth in training mode; call model.eval()")
        if t in (F.adaptive_avg_pool2d,) and tuple(val.shape[2:]) == (1, 1):
            return self._mean(node, args[0], (1, 2))
        if t in ("mean", torch.mean) and self.values[args[0]].dim() == 4:
            dims = node.kwargs.get("dim", args[1] if len(args) > 1 else None)
            dims = tuple(sorted(int(d) % 4 for d in (dims if isinstance(dims, (tuple, list)) else [dims])))
            if dims == (2, 3):
                return self._mean(node, args[0], (1, 2))
        raise IRConvertError(f"export tflite: {_what(self, node)} has no TFLite/LCE form in irconvert's exporter")

    def _reshape(self, node: fx.Node, x_node) -> None:
        """flatten / view / reshape to [N, features] in PyTorch's order (NCHW: TRANSPOSE first where H * W > 1)."""
        x = self._in(node, x_node)
        src, dst = tuple(self.values[x_node].shape), tuple(self.values[node].shape)
        if len(dst) == 4:
            if dst != src:
                raise IRConvertError(f"export tflite: {node.name} reshapes to a 4-D tensor {dst}; not supported")
            self.float[node] = x
            return
        if len(src) == 4 and src[2] * src[3] > 1:
            y = self.fb.tensor(src)
            self.fb.op(_BUILTIN["TRANSPOSE"], [x, self.fb.const(np.int32([0, 3, 1, 2]))], [y], _opt("TransposeOptions"))
            x = y
        self._emit(node, "RESHAPE", [x, self.fb.const(np.int32(dst))])


def _binary_params(m: nn.Module, w: torch.Tensor, linear: bool):
    """(signs [O, C, kh, kw], scale [O], bias [O], kernel, stride, dilation, padding) of frozen binary layer m."""
    w4 = w.reshape(w.shape[0], -1, 1, 1) if linear else w
    signs = torch.where(w4 >= 0, 1.0, -1.0)
    scale = w4.abs().reshape(w4.shape[0], -1)[:, 0]
    bias = m.bias.detach().float() if m.bias is not None else torch.zeros(w.shape[0])
    if linear:
        return signs, scale, bias, (1, 1), (1, 1), (1, 1), (0, 0)
    return signs, scale, bias, _pair(m.kernel_size), _pair(m.stride), _pair(m.dilation), _pair(m.padding)


def _what(conv: _Converter, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"layer {node.target} ({type(conv.modules[node.target]).__name__})"
    name = getattr(node.target, "__name__", str(node.target))
    return f"operation {node.name} ({name})"


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _words(channels: int) -> int:
    return math.ceil(channels / WORD_BITS)


def _tau_key(tau: Optional[torch.Tensor]):
    return None if tau is None else tau.float().numpy().tobytes()


def _same_matches(hw, k, s, d, pads) -> bool:
    """True if TF's SAME padding of an (h, w) input pads exactly PyTorch's symmetric `pads` on both sides
    (where the bottom/right pad is never read, PyTorch's output is TF's too)."""
    for size, kk, ss, dd, p in zip(hw, k, s, d, pads):
        torch_out = (size + 2 * p - dd * (kk - 1) - 1) // ss + 1
        tf_out = -(-size // ss)
        total = max((tf_out - 1) * ss + dd * (kk - 1) + 1 - size, 0)
        if torch_out != tf_out or total // 2 != p:
            return False
    return True


def _bn_affine(m: nn.Module, node: fx.Node) -> tuple[np.ndarray, np.ndarray]:
    """(alpha, beta) per channel with BN(x) = alpha * x + beta, for an eval BatchNorm."""
    if m.training or m.running_mean is None:
        raise IRConvertError(f"export tflite: {node.target} is a BatchNorm in training mode or without running "
                             "statistics; call model.eval()")
    with torch.no_grad():
        inv = torch.rsqrt(m.running_var.float() + m.eps)
        w = m.weight.detach().float() if m.weight is not None else torch.ones_like(inv)
        b = m.bias.detach().float() if m.bias is not None else torch.zeros_like(inv)
        alpha = w * inv
        beta = b - m.running_mean.float() * alpha
    return alpha.numpy().astype(np.float32), beta.numpy().astype(np.float32)


def _lce_filter(signs: torch.Tensor) -> np.ndarray:
    """LCE's bitpacked filter int32 [O, kh, kw, ceil(C_in / 32)] of +-1 `signs` [O, C_in, kh, kw]: each
    (o, kh, kw) pixel's channels packed on their own, bit j of word k = channel 32k + j, 1 = -1 (pack.py)."""
    o, c, kh, kw = signs.shape
    rows = signs.permute(0, 2, 3, 1).reshape(o * kh * kw, c)
    return pack_signs(rows).reshape(o, kh, kw, _words(c)).numpy()


@torch.no_grad()
def _thresholds(m: nn.Module, scale: torch.Tensor, bias: torch.Tensor, modules: list, tau, fan: int):
    """(int32 thresholds, channels to flip) with bit = (a' > thr) equal to sign(chain(y) - tau) = -1 for every
    accumulator a in 0..K, y = (K - 2a) * s + bias; (None, None) where some channel's -1 set is not
    one end of 0..K (a chain that is not monotone)."""
    a = torch.arange(fan + 1, dtype=torch.float32)
    y = (fan - 2 * a)[None, :] * scale[:, None] + bias[:, None]  # [O, K+1]
    image = not isinstance(m, nn.Linear)
    v = y.T.contiguous()  # [K+1, O]: a batch of K+1 values per channel
    if image:
        v = v.reshape(fan + 1, -1, 1, 1)
    for mod in modules:
        v = mod(v)
    v = v.reshape(fan + 1, -1)
    if tau is not None:
        v = v - tau.reshape(1, -1)
    neg = ~(v >= 0)  # [K+1, O]
    n = neg.sum(0)
    idx = torch.arange(fan + 1)[:, None]
    suffix = (neg == (idx >= fan + 1 - n[None, :])).all(0)  # -1 for the largest a: bit = a > K - n
    prefix = (neg == (idx < n[None, :])).all(0)  # -1 for the smallest a: flip the weights, a' = K - a
    if not bool((suffix | prefix).all()):
        return None, None
    flip = prefix & ~suffix
    return (fan - n).to(torch.int32), flip
