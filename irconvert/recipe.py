"""The recipe: one validated YAML file that describes a whole conversion run.

Sections: model, data, teacher, binarize (the Policy), train, output. Unknown keys are errors.
A recipe may start with `extends: other.yaml` (a path relative to the recipe's folder): the other
recipe is loaded first and this one's keys are merged over it, section by section. A relative
`model.pretrained` weights path in a recipe file is relative to that file's folder too; one given
by `--set` or from Python is relative to the working folder, as `data.root` always is.
`--set key.path=value` overrides are applied after merging, with YAML typing of the value.

Paths are stored absolute and resolved (symlinks, `..`, `~`): a run's recipe.yaml then rebuilds the
same run from any folder, and the recipe hash does not depend on how a path was spelled.
A recipe shipped with irconvert (`shipped.py`) is also found by its name: `--recipe quickstart`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import shipped
from .errors import IRConvertError, flag
from .plan import Policy

DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def canonical_path(path: str) -> str:
    """Return `path` absolute, with `~`, `..` and symlinks resolved (relative: to the working folder)."""
    return str(Path(path).expanduser().resolve())


class ModelSection(_Section):
    """Which network to convert and how to build it."""

    name: str
    source: Literal["timm", "torchvision"] = "timm"
    pretrained: Union[bool, str] = False  # true: the hub; a path: a local .safetensors / .pth (in a file: relative to it)
    kwargs: dict[str, Any] = Field(default_factory=dict)  # constructor kwargs: num_classes, in_chans, ...
    first_stride: Optional[int] = Field(None, ge=1)  # small images: stride of the first conv
    stem_pool: bool = True  # small images: false drops the max-pool right after the stem

    @field_validator("pretrained")
    @classmethod
    def _absolute(cls, v):
        return canonical_path(v) if isinstance(v, str) and v else v


class DataSection(_Section):
    """Where the images come from and how they are batched."""

    dataset: Literal["fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder"]
    root: Optional[str] = None  # default: Debian's /usr/share/datasets/<name>, else ./data
    download: bool = True  # torchvision download where the files are not found (needs internet)
    image_size: Optional[int] = Field(None, ge=8)  # default: the dataset's own (28, 32) or 224
    batch_size: int = Field(128, ge=1)
    val_batch_size: Optional[int] = Field(None, ge=1)
    workers: int = Field(0, ge=0)
    subset: Optional[int] = Field(None, ge=1)  # first N training images (a fixed random subset)
    val_subset: Optional[int] = Field(None, ge=1)
    hflip: float = Field(0.5, ge=0, le=1)
    crop_padding: int = Field(0, ge=0)  # small datasets: random crop after zero padding
    timm_transform: dict[str, Any] = Field(default_factory=dict)  # imagefolder: timm create_transform kwargs

    @field_validator("root")
    @classmethod
    def _absolute(cls, v):
        return canonical_path(v) if v else v


class Schedule(_Section):
    """An optimization schedule (timm's optimizer and scheduler factories)."""

    epochs: int = Field(1, ge=1)
    optimizer: str = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    scheduler: Literal["cosine", "linear", "none"] = "cosine"  # linear: to min_lr at the last step
    warmup_epochs: int = Field(0, ge=0)
    min_lr: float = Field(0.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: Optional[float] = Field(None, gt=0)
    # norm: the global gradient norm is at most grad_clip; agc: adaptive clipping (Brock et al. 2021),
    # each unit's (output channel's) ||g|| at most grad_clip * max(||w||, 1e-3), 0.01-0.02 for BNNs;
    # value: every gradient entry within +-grad_clip (timm's dispatch_clip_grad)
    grad_clip_mode: Literal["norm", "agc", "value"] = "norm"
    max_steps_per_epoch: Optional[int] = Field(None, ge=1)  # quick runs and tests
    # the latent weights of binary layers: their sign is what counts, and decay pulls them towards 0,
    # where the sign flips on every step; None: the same weight_decay as the other weights
    latent_weight_decay: Optional[float] = Field(None, ge=0)
    # std: each binary layer's lr is lr * spread(w) / median spread over the binary layers, spread = the
    # mean per-output-channel std of its latent weight. Libra-PB standardizes w, so an Adam step of lr
    # moves w_hat by lr / spread: scaled so, w_hat (and its signs) moves at one rate in every layer
    # a number u: each binary layer's lr is u * spread(w), an Adam step of u in units of w_hat (the same flip
    # dynamics in every layer and model whatever the scale its weights were trained to)
    latent_lr: Union[Literal["same", "std"], Annotated[float, Field(gt=0)]] = "same"
    # after the last epoch: BatchNorm running statistics recomputed over this many training batches
    # (plain average, train-mode forward, no gradient); 0: keep the running averages of training
    bn_reestimate: int = Field(0, ge=0)


class TeacherSection(_Section):
    """The full-precision model: optionally fine-tuned on the recipe's data, then the KD teacher."""

    finetune: Optional[Schedule] = None


class EDESection(_Section):
    """EDE's t schedule: t = 10^(log10 t_min + (log10 t_max - log10 t_min) * progress)."""

    t_min: float = Field(1e-3, gt=0)
    t_max: float = Field(10.0, gt=0)
    update: Literal["step", "epoch"] = "step"

    @model_validator(mode="after")
    def _ordered(self):
        if self.t_max < self.t_min:
            raise ValueError(f"t_max ({self.t_max}) must not be below t_min ({self.t_min})")
        return self


class DistillSection(_Section):
    """Knowledge distillation from the teacher:

        loss = alpha * T^2 * KL(p_T || q_T) + (1 - alpha) * CE + attention * sum_l mean((Q_s^l - Q_t^l)^2)

    alpha=1, T=1 is ReActNet's distributional loss (the teacher's soft labels only). Q^l is the
    attention map of Zagoruyko & Komodakis (ICLR 2017), the channel mean of the squared feature map
    of layer l, flattened and L2-normalized per image (`distill.py`); the layers are
    `attention_layers`, by default the model's top-level nn.Sequential children (ResNet's layer1-4).
    """

    enabled: bool = True
    alpha: float = Field(0.9, ge=0, le=1)
    temperature: float = Field(4.0, gt=0)
    attention: float = Field(0.0, ge=0)  # beta of attention transfer; 0: off (Zagoruyko & Komodakis used 1000)
    attention_layers: tuple[str, ...] = ()


class TrainSection(Schedule):
    """The binary fine-tune: a Schedule plus EDE, distillation, precision and seed."""

    ede: EDESection = Field(default_factory=EDESection)
    distill: DistillSection = Field(default_factory=DistillSection)
    # a two-stage schedule: the W1A1 layers train as W1A32 (binary weights, real activations) for
    # the first this-many epochs, then as W1A1 from there; one LR and EDE schedule over all epochs
    w1a32_epochs: int = Field(0, ge=0)
    amp: Literal["off", "bf16", "fp16"] = "off"
    seed: int = Field(0, ge=0, lt=2**32)  # epoch seeds are derived from it and must fit torch's 64 bits
    device: str = "auto"
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # torchrun jobs: NCCL on GPUs, gloo on CPUs
    sync_bn: bool = False  # torchrun jobs on GPUs: BatchNorm statistics over all processes
    compile: Union[Literal["auto"], bool] = "auto"  # torch.compile the model for training; auto: on CUDA

    @model_validator(mode="after")
    def _second_stage(self):
        if self.w1a32_epochs and self.w1a32_epochs >= self.epochs:
            raise ValueError(f"w1a32_epochs ({self.w1a32_epochs}) must be below epochs ({self.epochs}), "
                             "so that the last epochs train the binary activations")
        return self

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_off(cls, v):
        # YAML 1.1 reads a bare `off` as false
        return "off" if v is False else v


class OutputSection(_Section):
    """What a run writes, and where."""

    dir: Optional[str] = None  # default: runs/<model name>
    export: bool = True  # model.safetensors and packed.safetensors
    plot: bool = True  # curves.png
    checkpoint: bool = True  # checkpoint.pt at the end of every epoch (for --resume)
    keep_checkpoint: bool = False  # keep checkpoint.pt after a successful export (it is ~4x the model)
    tensorboard: bool = False  # TensorBoard event files in <dir>/tensorboard (pip install tensorboard)


class Recipe(_Section):
    """A whole conversion run."""

    model: ModelSection
    data: DataSection
    teacher: TeacherSection = Field(default_factory=TeacherSection)
    binarize: Policy = Field(default_factory=Policy)
    train: TrainSection = Field(default_factory=TrainSection)
    output: OutputSection = Field(default_factory=OutputSection)

    def digest(self) -> str:
        """Return a short hash of everything that shapes the result (not the output section)."""
        body = self.model_dump(mode="json", exclude={"output"})
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        """Return the resolved recipe as YAML."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


MAX_YAML_BYTES = 1 << 20  # a recipe is a few hundred bytes; a bigger file is a mistake
MAX_YAML_DEPTH = 32  # recipes nest 4 deep
MAX_YAML_NODES = 100_000  # nodes after alias expansion ("billion laughs" expands to 10^9)


class _Bounded(yaml.SafeLoader):
    """A SafeLoader that refuses, while composing and before anything is expanded, documents nested
    deeper than MAX_YAML_DEPTH, whose aliases expand to more than MAX_YAML_NODES nodes, or whose
    alias points into its own anchor (a loop that no later step could walk)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth, self._nodes, self._weight = 0, 0, {}

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            target = self.anchors.get(self.peek_event().anchor)
            if target is not None:
                if id(target) not in self._weight:
                    raise yaml.YAMLError(f"alias *{self.peek_event().anchor} refers to its own anchor (a loop)")
                self._count(self._weight[id(target)])
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise yaml.YAMLError(f"nested deeper than {MAX_YAML_DEPTH} levels")
        before = self._nodes
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._count(1)
        self._weight[id(node)] = self._nodes - before
        return node

    def _count(self, n: int) -> None:
        self._nodes += n
        if self._nodes > MAX_YAML_NODES:
            raise yaml.YAMLError(f"expands to more than {MAX_YAML_NODES} values (aliases repeated)")


def safe_yaml(text: str) -> Any:
    """Return the YAML document in `text`, bounded in depth and alias expansion (yaml.YAMLError if not)."""
    loader = _Bounded(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml_file(path: Path, what: str = "recipe") -> Any:
    """Return the YAML document in the file `path`, or raise IRConvertError naming the file and the problem."""
    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise IRConvertError(f"{path}: {path.stat().st_size} bytes is too large for a {what} "
                                 f"(at most {MAX_YAML_BYTES}); pass the right file")
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise IRConvertError(f"{path}: cannot read the {what} ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:120] if str(exc) else ''})") from None
    try:
        return safe_yaml(text)
    except RecursionError:
        raise IRConvertError(f"{path}: is not valid YAML (nested too deeply)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise IRConvertError(f"{path}:{where} is not valid YAML ({problem})") from None


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _relative_to(raw: dict, folder: Path) -> None:
    """Make a relative `model.pretrained` path relative to the recipe's folder (as `extends` is), in place."""
    model = raw.get("model")
    weights = model.get("pretrained") if isinstance(model, dict) else None
    if isinstance(weights, str) and weights and not Path(weights).expanduser().is_absolute():
        # resolved before joining: `recipes/` may be a link, and `recipes/../x` is then not `./x`
        model["pretrained"] = str(folder.resolve() / weights)


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    if not path.is_file():
        raise IRConvertError(f"{path}: recipe not found; pass an existing YAML file")
    if path.resolve() in chain:
        raise IRConvertError(f"{path}: 'extends' loops back to itself")
    raw = read_yaml_file(path)
    if raw is None:
        raise IRConvertError(f"{path}: the recipe is empty; it needs at least model: and data: sections")
    if not isinstance(raw, dict):
        raise IRConvertError(f"{path}: a recipe is a YAML mapping of sections (model, data, ...)")
    _relative_to(raw, path.parent)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    base = _read_yaml((path.parent / str(parent)), chain + (path.resolve(),))
    return _merge(base, raw)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return `raw` with each 'a.b.c=value' applied (value parsed as YAML)."""
    raw = json.loads(json.dumps(raw))
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise IRConvertError(f"{flag('set', item, label=True)}: expected key.path=value, e.g. train.epochs=2")
        try:
            value = safe_yaml(text)
        except (yaml.YAMLError, RecursionError):
            value = text
        _check_key(key, flag("set", item, label=True))
        _set(raw, key, value, flag("set", item, label=True))
    return raw


def _section_class(annotation) -> Optional[type]:
    """Return the pydantic model a field holds (through Optional / Union), or None (a value, a free dict)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _section_class(arg)
        if found is not None:
            return found
    return None


def unknown_key(path: list[str], schema: type = None) -> Optional[tuple[str, list[str]]]:
    """Return (the first unknown dotted key of `path`, the close known keys) against the recipe's schema,
    or None where every part is known (parts under a free mapping such as model.kwargs are not checked)."""
    import difflib

    schema = schema or Recipe
    for i, part in enumerate(path):
        fields = schema.model_fields
        if part not in fields:
            prefix = ".".join(path[:i])
            keys = [f"{prefix}.{k}" if prefix else k for k in fields]
            wrong = ".".join(path[:i + 1])
            return wrong, difflib.get_close_matches(wrong, keys, n=3, cutoff=0.6)
        schema = _section_class(fields[part].annotation)
        if schema is None:
            return None
    return None


def _check_key(key: str, what: str) -> None:
    """Refuse an override of a key the recipe has not, suggesting the close ones."""
    found = unknown_key(key.split("."))
    if found:
        wrong, close = found
        hint = f"; did you mean {' or '.join(close)}?" if close else "; see the recipe fields (docs: recipes)"
        raise IRConvertError(f"{what}: the recipe has no key {wrong}{hint}")


def _set(raw: dict, key: str, value: Any, what: str) -> None:
    node = raw
    parts = key.split(".")
    for p in parts[:-1]:
        if node.get(p) is None:  # an absent or null section (teacher.finetune: null) starts empty
            node[p] = {}
        if not isinstance(node[p], dict):
            raise IRConvertError(f"{what}: {p} is not a section")
        node = node[p]
    node[parts[-1]] = value


def resolve_recipe(recipe: Union[Recipe, str, os.PathLike], overrides: list[str] = (),
                   fields: Optional[dict[str, Any]] = None) -> Recipe:
    """Return `recipe` (a Recipe or a path) with the --set `overrides` and then the typed `fields`
    ({'train.seed': 3, ...}; None values skipped) applied, validated."""
    if isinstance(recipe, Recipe):
        raw, origin = recipe.model_dump(mode="json"), "recipe"
    else:
        raw, origin = _read_yaml(shipped.find(recipe)), str(recipe)
    raw = apply_overrides(raw, list(overrides))
    for key, value in (fields or {}).items():
        if value is not None:
            _set(raw, key, value, key)
    return validate(raw, origin)


def validate(raw: dict, origin: str = "recipe") -> Recipe:
    """Return the Recipe of a raw mapping, or raise IRConvertError naming field, value and what is allowed."""
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        errs = exc.errors()
        e = errs[0]
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            found = unknown_key([str(p) for p in e["loc"]])
            close = found[1] if found else []
            msg = f"unknown key; did you mean {' or '.join(close)}?" if close else \
                "unknown key; check its spelling against the recipe fields (docs: recipes)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif "input" in e and not isinstance(e["input"], dict):
            msg = f"{msg} (got {e['input']!r})"
        more = f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})" if len(errs) > 1 else ""
        raise IRConvertError(f"{origin}: {loc}: {msg}{more}") from None


def policy_from_sets(overrides: list[str]) -> Policy:
    """Return the default Policy with `binarize.KEY=VALUE` overrides: what --set can change when
    --convert-only runs without a recipe (there is no training, so no other field means anything)."""
    other = [s for s in overrides if not s.startswith("binarize.")]
    if other:
        raise IRConvertError(f"--set {other[0]!r}: without --recipe, --convert-only takes only binarize.* fields "
                             "(it trains nothing); pass --recipe R for the others, or drop it")
    raw = apply_overrides({"binarize": {}}, list(overrides))["binarize"]
    try:
        return Policy.model_validate(raw)
    except ValidationError as exc:
        e = exc.errors()[0]
        loc = ".".join(str(p) for p in e["loc"])
        got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
        raise IRConvertError(f"--set: binarize.{loc}: {e['msg']}{got}") from None


def load_recipe(path: Union[str, os.PathLike], overrides: list[str] = ()) -> Recipe:
    """Return the validated Recipe in `path` (a file, or a shipped recipe's name; with `extends` resolved
    and `overrides` applied)."""
    path = shipped.find(path)
    raw = apply_overrides(_read_yaml(path), list(overrides))
    return validate(raw, str(path))
