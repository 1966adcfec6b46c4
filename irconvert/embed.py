"""The embedded architecture: a user's own model (no timm / torchvision origin) stored through
`torch.export` beside its packed file, so that `load_packed(path)` rebuilds it without the code that
defined it. Opt-in: `save_packed(model, path, embed=True)` writes `NAME.arch.pt2` beside `NAME.safetensors`.

What is exported (option "a" of issue 15): the *full-precision architecture* around the binary layers,
not the binary model's own graph. Before export, every binary layer becomes the plain nn.Conv2d /
nn.Linear it was made from (and a Bi-Real shortcut's BatchNorm the plain BatchNorm), and
`torch.export.export` runs on that copy in eval mode with the batch dimension dynamic and those layers'
call signatures preserved. Hardtanh swaps are already in the copy and so in the graph. On load,
`torch.export.unflatten` gives back the module hierarchy with the original names (so the plan's layer
names and the state_dict keys still fit); each preserved layer is replaced by a fresh eager module
rebuilt from its constructor arguments (stored in the packed file's metadata), and verify.py replays
the binarization plan on it and loads the packed weights exactly as with `model=`. So the binary
layers are irconvert's own classes (the bitwise runtime can take them over), and everything else runs
the exported aten ops with the same kernels as the eager model: outputs are bit-identical.
Why not the binary model's graph (option "b"): it would bake irconvert's layer internals into the
file, and the runtime could not find its layers in it.

Weight-free: the program's parameters and buffers are written as meta tensors (zero bytes); the
packed file holds every weight. Tensor constants the forward creates stay in the archive.

Loading without pickle: `torch.export.load` may unpickle (weights or constants marked `use_pickle`,
sample inputs through torch.load's weights_only=False fallback) and exec its guard code. This module
reads the .pt2 zip itself: the program JSON, the weight and constant configs, and raw tensor bytes,
refusing any pickled payload, any guard code, nested graphs or custom objects, any node whose target
is not an aten op or getitem, and any symbolic shape expression that is not plain arithmetic on
sympy names (the deserializer hands those to sympy.sympify, which evaluates Python). Only then does it
call torch's ExportedProgramDeserializer, with zero tensors for the weights and no sample inputs.
The packed file records the SHA-256 of the .pt2, so a replaced or edited architecture file is caught.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import json
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .errors import IRConvertError
from .fileformat import atomic_path
from .layer_summary import default_input_size
from .layers import BinaryMixin
from .shortcut import ShortcutMixin
from .version import __version__

ARCH_SUFFIX = ".arch.pt2"
_MARKER = "irconvert"  # the archive's extra file that says irconvert wrote it
_PLAIN = {cls.__name__: cls for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear,
                                         nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)}
_ARGS = {  # the constructor arguments that rebuild each plain class, read back from its attributes
    "conv": ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"),
    "linear": ("in_features", "out_features"),
    "norm": ("num_features", "eps", "momentum", "affine", "track_running_stats"),
}
# the names a shape expression may call: sympy's and torch's symbolic-shape functions
_SYMPY_NAMES = {"Symbol", "Integer", "Rational", "Float", "Max", "Min", "Mod", "FloorDiv", "CeilDiv", "CleanDiv",
                "PythonMod", "IntTrueDiv", "FloatTrueDiv", "TruncToInt", "CeilToInt", "FloorToInt", "ToFloat",
                "Identity", "Abs", "Add", "Mul", "true", "True", "False"}
_SYMBOL = re.compile(r"[a-z]+\d*\Z")


def arch_path(packed: Path) -> Path:
    """Return the architecture file's path beside packed file `packed` (NAME.safetensors -> NAME.arch.pt2)."""
    return packed.with_name(packed.name.removesuffix(".safetensors") + ARCH_SUFFIX)


def _config(m: nn.Module, cls: type) -> dict[str, Any]:
    """Return {'type', constructor arguments} that rebuild plain module class `cls` shaped like `m`."""
    if cls.__name__ not in _PLAIN or _PLAIN[cls.__name__] is not cls:
        return {}
    kind = "linear" if cls is nn.Linear else "norm" if "BatchNorm" in cls.__name__ else "conv"
    args = {a: getattr(m, a) for a in _ARGS[kind]}
    if kind != "norm":
        args["bias"] = m.bias is not None
    return {"type": cls.__name__, **{k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}}


def build(config: dict[str, Any]) -> nn.Module:
    """Return the plain module (fresh weights) that a stored config describes."""
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k != "type"}
    return _PLAIN[config["type"]](**args)


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def swap_points(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Return {name: config} of the modules that the load replaces by eager ones: the binary layers and
    the BatchNorms that carry a Bi-Real shortcut; raise IRConvertError for a class it cannot rebuild."""
    the_plan = model.irconvert_plan
    points = {}
    names = [n for n, lp in the_plan.layers.items() if lp.mode is not None] + [norm for _, norm in the_plan.shortcuts]
    for name in names:
        m = model.get_submodule(name)
        mro = type(m).__mro__  # a binary layer's class is (Binary*, BinaryMixin, base), a shortcut's alike
        base = mro[2] if len(mro) > 2 and mro[1] in (BinaryMixin, ShortcutMixin) else type(m)
        points[name] = _config(m, base)
        if not points[name]:
            raise IRConvertError(f"embed: layer {name} is a {base.__name__}; an embedded architecture rebuilds only "
                                 f"plain {', '.join(_PLAIN)} around its binary layers; load it with model= instead")
    return points


def _plain_copy(model: nn.Module, points: dict[str, dict[str, Any]]) -> nn.Module:
    """Return an eval-mode CPU copy of `model` with every swap point a plain module of its config."""
    skeleton = copy.deepcopy(model).cpu()  # the file is device-free; load_packed builds on the CPU
    for name, config in points.items():
        _replace(skeleton, name, build(config))
    return skeleton.eval()


def export_architecture(model: nn.Module, path: Path, example: Optional[torch.Tensor] = None) -> dict[str, Any]:
    """Write the weight-free ExportedProgram of binarized `model`'s architecture to `path` (atomically) and
    return the packed file's 'architecture' entry: file name, SHA-256, the swap points' configs and the
    input size it was exported at (batch dimension dynamic; `example` defaults to random input of the
    model's input size)."""
    points = swap_points(model)
    if example is None:
        if not getattr(model, "irconvert_input_size", None) and not (getattr(model, "pretrained_cfg", None) or {}).get(
                "input_size"):  # 224x224 would be a guess, and the reload would refuse any other size
            raise IRConvertError(f"embed: the input size of this {type(model).__name__} is unknown (it was not "
                                 "calibrated on a batch); pass save_packed(..., embed=example_batch), or "
                                 "binarize(..., calibrate=batch) first")
        example = torch.randn((2,) + tuple(default_input_size(model)), generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(_plain_copy(model, points), (example.cpu(),), dynamic_shapes=({0: batch},),
                                     preserve_module_call_signature=tuple(points), strict=False)
    except Exception as exc:
        raise IRConvertError(f"embed: torch.export cannot export this model ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:160]}); save without embed and load with model=") from None
    _strip(ep)
    if path.exists() and not _is_ours(path):
        raise IRConvertError(f"{path}: exists and is not an irconvert architecture file; move it away or "
                             "save the packed file under another name")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.export.save(ep, f, extra_files={_MARKER: json.dumps({"irconvert_version": __version__})})
    return {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "modules": points,
            "input_size": list(example.shape[1:])}


def _strip(ep) -> None:
    """Make `ep` weight-free (meta parameters and buffers, no sample inputs, no source paths)."""
    for key, value in list(ep.state_dict.items()):
        meta = torch.empty_like(value, device="meta")
        ep.state_dict[key] = nn.Parameter(meta, value.requires_grad) if isinstance(value, nn.Parameter) else meta
    for key, value in ep.constants.items():
        if not isinstance(value, torch.Tensor):
            raise IRConvertError(f"embed: the model holds a {type(value).__name__} constant ({key}); "
                                 "only tensors can be embedded; load it with model= instead")
    ep._example_inputs = None
    for node in ep.graph.nodes:  # the user's source paths do not belong in a deployment file
        node.meta.pop("stack_trace", None)


def _is_ours(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith(f"extra/{_MARKER}") for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def load_architecture(entry: dict[str, Any], packed: Path) -> nn.Module:
    """Return the unbinarized architecture that packed file `packed` embeds (its 'architecture' entry):
    the unflattened program with each swap point an eager module, ready for the plan's replay."""
    name = str(entry.get("file", ""))
    path = packed.with_name(name)
    if not name or Path(name).name != name:
        raise IRConvertError(f"{packed}: its architecture entry names no file beside it; export it again")
    if not path.is_file():
        raise IRConvertError(f"{path}: file not found; {packed.name} embeds its architecture there: copy it "
                             "beside the packed file, or pass the architecture as model=")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise IRConvertError(f"{path}: does not match {packed.name} (edited, corrupted or from another save); "
                             "save the packed file with embed=True again")
    try:
        ep = _read_program(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unflatten warns about the lifted get_attr nodes it rewires
            net = torch.export.unflatten(ep)
        for point, config in entry.get("modules", {}).items():
            _replace(net, point, build(config))
    except IRConvertError:
        raise
    except Exception as exc:
        raise IRConvertError(f"{path}: not a readable architecture file ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); save it again") from None
    return net


def _read_program(path: Path):
    """Return the ExportedProgram in .pt2 archive `path`, read without unpickling anything (module doc)."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    with zipfile.ZipFile(path) as z:
        files = {n.split("/", 1)[1]: n for n in z.namelist() if "/" in n}
        read = lambda name: z.read(files[name])  # noqa: E731
        if f"extra/{_MARKER}" not in files:
            raise IRConvertError(f"{path}: not an irconvert architecture file (no {_MARKER} entry); save it again")
        program = json.loads(read("models/model.json"))
        _check_program(program, path)
        weights = _dict_to_dataclass(schema.PayloadConfig, json.loads(read("data/weights/model_weights_config.json")))
        consts = _dict_to_dataclass(schema.PayloadConfig, json.loads(read("data/constants/model_constants_config.json")))
        state = {k: _zeros(p, path) for k, p in weights.config.items()}
        constants = {k: _constant(p, read, path) for k, p in consts.config.items()}
    serialized = _dict_to_dataclass(schema.ExportedProgram, program)
    return ExportedProgramDeserializer().deserialize(serialized, state, constants, b"")


def _zeros(payload, path: Path) -> torch.Tensor:
    """A weight of the program: zeros of its shape (the packed file's tensors replace them)."""
    from torch._export.serde.serialize import deserialize_scalar_type

    if payload.use_pickle or payload.tensor_meta is None:
        raise IRConvertError(f"{path}: holds a pickled weight; irconvert never unpickles; save it again")
    meta = payload.tensor_meta
    t = torch.zeros([s.as_int for s in meta.sizes], dtype=deserialize_scalar_type(meta.dtype))
    return nn.Parameter(t, meta.requires_grad) if payload.is_param else t


def _constant(payload, read, path: Path) -> torch.Tensor:
    """A tensor constant of the program, from its raw bytes in the archive."""
    from torch._export.serde.serialize import deserialize_scalar_type

    if payload.use_pickle or payload.tensor_meta is None or not payload.path_name.startswith("tensor_"):
        raise IRConvertError(f"{path}: holds a pickled or custom-object constant; irconvert never unpickles; "
                             "save it again")
    meta = payload.tensor_meta
    dtype = deserialize_scalar_type(meta.dtype)
    raw = bytearray(read(f"data/constants/{payload.path_name}"))
    sizes, strides = [s.as_int for s in meta.sizes], [s.as_int for s in meta.strides]
    if not raw:  # an empty tensor is stored as no bytes
        return torch.zeros(sizes, dtype=dtype)
    # as_strided checks that the view stays inside the bytes read
    return torch.as_strided(torch.frombuffer(raw, dtype=dtype), sizes, strides, meta.storage_offset.as_int).clone()


def _check_program(program: dict, path: Path) -> None:
    """Refuse a program that the deserializer would turn into code: guards, subgraphs, custom objects,
    targets other than aten ops and getitem, shape expressions other than arithmetic on names."""
    if program.get("guards_code"):
        raise IRConvertError(f"{path}: holds guard code; irconvert runs no code from a file; save it again")
    for node in program["graph_module"]["graph"]["nodes"]:
        target = node.get("target", "")
        if not (target.startswith("torch.ops.aten.") or target == "_operator.getitem"):
            raise IRConvertError(f"{path}: calls {target!r}, not an aten operator; save it again")
    for key, value in _walk(program):
        if key in ("as_graph", "as_custom_obj", "as_opaque_obj") and value is not None:
            raise IRConvertError(f"{path}: holds a {key[3:]}; an embedded architecture has only aten ops")
        if key == "expr_str" and not _plain_expression(value):
            raise IRConvertError(f"{path}: holds a shape expression that is not plain arithmetic; save it again")


def _walk(value: Any):
    """Yield every (key, value) of the nested dicts and lists of a JSON document."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield k, v
            yield from _walk(v)
    elif isinstance(value, list):
        for v in value:
            yield from _walk(v)


def _plain_expression(text: Any) -> bool:
    """True if `text` is arithmetic on symbol names and numbers, calling only sympy's shape functions."""
    if not isinstance(text, str) or len(text) > 500:
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return False
    ops = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.USub, ast.UAdd)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in _SYMPY_NAMES):
                return False
        elif isinstance(node, ast.Name):
            if node.id not in _SYMPY_NAMES and not _SYMBOL.match(node.id):
                return False
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, str) and not _SYMBOL.match(node.value):
                return False
        elif not isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.keyword, ast.Load) + ops):
            return False
    return True
