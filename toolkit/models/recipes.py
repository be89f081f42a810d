"""Recipes: a TOML file per documented experiment, parsed into a typed, validated object.

An unknown key, a wrong type (strict: ``epochs = "20"`` is not a number), a NaN or infinite
number, or an out-of-range value is a ToolkitError that names the file and the key
(``recipes/x.toml: optimizer.lr: must be greater than 0``), never a silent default. The name
becomes a directory name, so it must be a plain one (``files.plain_name``).
"""

from __future__ import annotations

import difflib

import tomllib
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from toolkit.core.datasets import facts
from toolkit.core.errors import ToolkitError, first_line, shown
from toolkit.core.files import name_problem, read_text_limited, reading
from toolkit.models.registry import MODELS, create_model, resolved_options, takes_option

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"  # the repository's recipes/ (toolkit/models/recipes.py)
MAX_BYTES = 1 << 20  # a recipe is a few hundred bytes


class Strict(BaseModel):
    # strict: no "20" for 20; allow_inf_nan: a learning rate of nan or inf is never meant
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class ModelSpec(Strict):
    name: str
    options: dict[str, Union[int, float, bool, str, list[int]]] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
        return name


class ShiftScaleRotate(Strict):
    shift: float = Field(ge=0, le=1)
    scale: float = Field(ge=0, le=1)
    rotate: float = Field(ge=0, le=180)
    p: float = Field(ge=0, le=1)


class CoarseDropout(Strict):
    holes: int = Field(ge=1)
    size: int = Field(ge=1)
    p: float = Field(ge=0, le=1)


class Augment(Strict):
    """Training-time augmentations; the test split only gets normalization."""

    library: Literal["torchvision", "albumentations"] = "torchvision"
    rotation: float = Field(default=0.0, ge=0, le=180)  # degrees, uniform in [-rotation, rotation]
    random_crop_padding: int = Field(default=0, ge=0)
    hflip: float = Field(default=0.0, ge=0, le=1)  # probability
    shift_scale_rotate: Optional[ShiftScaleRotate] = None
    coarse_dropout: Optional[CoarseDropout] = None

    @model_validator(mode="after")
    def _library_supports(self) -> "Augment":
        if self.library == "torchvision" and (self.shift_scale_rotate or self.coarse_dropout):
            raise ValueError("shift_scale_rotate and coarse_dropout need library = 'albumentations'")
        return self


class Data(Strict):
    # a built-in dataset, or "folder": the user's own images (toolkit.inference.folder), which then needs
    # root, size and channels
    dataset: Literal["mnist", "fashion_mnist", "cifar10", "cifar100", "folder"]
    root: Optional[str] = Field(default=None, min_length=1, max_length=4096)  # the image folder (relative: to the working directory)
    size: Optional[int] = Field(default=None, ge=8, le=512)  # images are resized to size x size
    channels: Optional[Literal[1, 3]] = None  # 1: grayscale, 3: RGB
    split: float = Field(default=0.2, gt=0, lt=1)  # test fraction per class when root has no train/ and test/ folders
    mean: Optional[list[float]] = None  # per channel, of pixels scaled to [0, 1]; computed from the training split when not given
    std: Optional[list[float]] = None
    strict: bool = False  # refuse an unreadable image file instead of skipping it with a warning
    # a seeded fraction of the training split held out to choose best.pt, for early stopping and for
    # the plateau scheduler, so the test split is used only to report. Default: 0.1 for an image
    # folder; 0 for the built-in datasets, whose seed recipes chose "best" on the test set (their
    # figures depend on it)
    validation: Optional[float] = Field(default=None, ge=0, lt=1)
    batch_size: int = Field(ge=1, le=65536)
    test_batch_size: int = Field(default=1000, ge=1, le=65536)
    augment: Augment = Field(default_factory=Augment)
    # "fast" (default): the split stays one uint8 tensor on the training device, augmented
    # batch-wise with the same parameter ranges (toolkit.data.fast; tests/data/test_fastdata.py checks
    # the distributions). "dataloader": torchvision dataset + per-sample torchvision /
    # albumentations transforms + DataLoader, as the write-ups ran it. Over 20 fine4 epochs the two
    # reach the same accuracy: the seed moves the result more than the pipeline does (docs/benchmarks.md).
    pipeline: Literal["fast", "dataloader"] = "fast"

    @model_validator(mode="after")
    def _folder_keys(self) -> "Data":
        folder_keys = [k for k in ("root", "size", "channels", "mean", "std") if getattr(self, k) is not None]
        if self.dataset != "folder":
            if folder_keys:
                raise ValueError(f"{folder_keys[0]} is for dataset = 'folder' (an image folder), not for {self.dataset}")
            return self
        if self.root is None:
            raise ValueError("dataset = 'folder' needs root (the image folder; size and channels are read from its images when not given)")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is not None and self.channels is not None and (len(value) != self.channels or any(v <= 0 and key == "std" for v in value)):
                raise ValueError(f"{key} needs {self.channels} value(s), one per channel" + (", each above 0" if key == "std" else ""))
        if self.pipeline != "fast":
            raise ValueError("an image folder trains on the fast pipeline (its decoded images are cached in memory)")
        return self

    @property
    def validation_fraction(self) -> float:
        if self.validation is not None:
            return float(self.validation)
        return 0.1 if self.dataset == "folder" else 0.0

    @property
    def channels_in(self) -> int:
        """The channels of the images this data section gives a model."""
        return int(self.channels) if self.dataset == "folder" else facts(self.dataset).channels


class Optimizer(Strict):
    name: Literal["sgd"] = "sgd"
    lr: float = Field(gt=0, le=10)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    nesterov: bool = False


class StepLR(Strict):
    name: Literal["step"]
    step_size: int = Field(ge=1)
    gamma: float = Field(gt=0, le=1)


class Plateau(Strict):
    """ReduceLROnPlateau on the test loss each epoch, as the write-ups did."""

    name: Literal["plateau"]
    factor: float = Field(gt=0, lt=1)
    patience: int = Field(ge=0)
    mode: Literal["min"] = "min"


class Cosine(Strict):
    name: Literal["cosine"]
    t_max: int = Field(ge=1)
    eta_min: float = Field(default=0.0, ge=0)


class Piecewise(Strict):
    """Piecewise-constant learning rate by optimizer step (Keras PiecewiseConstantDecay)."""

    name: Literal["piecewise"]
    boundaries: list[int]
    values: list[float]

    @model_validator(mode="after")
    def _shape(self) -> "Piecewise":
        if len(self.values) != len(self.boundaries) + 1:
            raise ValueError("values needs exactly one more entry than boundaries")
        if any(b <= a for a, b in zip(self.boundaries, self.boundaries[1:])) or any(b < 1 for b in self.boundaries):
            raise ValueError("boundaries must be positive and increasing")
        if any(v <= 0 for v in self.values):
            raise ValueError("values must be positive")
        return self


class NoSchedule(Strict):
    name: Literal["none"]


Scheduler = Annotated[Union[StepLR, Plateau, Cosine, Piecewise, NoSchedule], Field(discriminator="name")]


class EarlyStopping(Strict):
    """``test_loss``: stop after ``patience`` epochs without a lower test loss (Keras default).
    ``gap``: stop once train accuracy exceeds test accuracy by ``max_gap`` points for
    ``patience`` epochs in a row (the FT write-ups' "15% gap for 10 epochs")."""

    monitor: Literal["test_loss", "gap"]
    patience: int = Field(ge=1)
    max_gap: float = Field(default=15.0, gt=0)


class SeedResults(Strict):
    """What the write-up reports, so tables can put seed and measured side by side."""

    source: str
    params: Optional[int] = Field(default=None, ge=1)
    test_acc: Optional[float] = Field(default=None, ge=0, le=100)  # final epoch
    best_test_acc: Optional[float] = Field(default=None, ge=0, le=100)
    train_acc: Optional[float] = Field(default=None, ge=0, le=100)


MAX_SEED = 2**32 - 1  # what every generator the run seeds (torch, Python, NumPy's workers) accepts


class Recipe(Strict):
    name: str = ""  # parse_recipe fills in the file's stem
    _inferred: str | None = PrivateAttr(default=None)  # what load_recipe read from an image folder (size, channels)
    description: str = ""
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    epochs: int = Field(ge=1, le=10000)
    model: ModelSpec
    data: Data
    optimizer: Optimizer
    scheduler: Scheduler = Field(default_factory=lambda: NoSchedule(name="none"))
    early_stopping: Optional[EarlyStopping] = None
    seed_results: Optional[SeedResults] = None

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        problem = name_problem(name)
        if problem:  # run directories are named after the recipe
            raise ValueError(f"{name[:80]!r} {problem}; it names the run directory, so it must be a plain name")
        return name

    @model_validator(mode="after")
    def _model_fits_dataset(self) -> "Recipe":
        entry = MODELS.get(self.model.name)
        channels = self._options().get("in_channels", entry.channels) if entry is not None else None
        if entry is not None and channels != self.data.channels_in:
            what = f"{self.data.channels_in}-channel folder" if self.data.dataset == "folder" else self.data.dataset
            raise ValueError(f"model {self.model.name!r} does not take {what} images")
        return self

    def _options(self) -> dict:
        """The model options; for an image folder, the models that can adapt their input channels
        get the folder's (the zoo's CIFAR nets on grey images, the MNIST nets on RGB)."""
        options = dict(self.model.options)
        entry = MODELS.get(self.model.name)
        if self.data.dataset == "folder" and entry is not None and "in_channels" not in options and takes_option(self.model.name, "in_channels"):
            options["in_channels"] = self.data.channels_in
        return options

    def resolved(self) -> "Recipe":
        """This recipe with every model option spelled out, as checkpoints store it."""
        options = resolved_options(self.model.name, self._options())
        return self.model_copy(update={"model": self.model.model_copy(update={"options": options})})

    def build_model(self, num_classes: int):
        options = self._options()
        options.setdefault("num_classes", num_classes)
        return create_model(self.model.name, **options)


def format_validation_error(where: str | Path, exc: ValidationError) -> str:
    """``<where>: <key>: <what is wrong>`` for the first error pydantic found."""
    err = exc.errors()[0]
    # discriminated unions add the tag ("step", "plateau", ...) to the location; drop it
    loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p in {"step", "plateau", "cosine", "piecewise", "none"}))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":  # a misspelt required key arrives as an unknown key beside it: name it
        parent, name = tuple(err["loc"][:-1]), str(err["loc"][-1])
        unknown = [str(e["loc"][-1]) for e in exc.errors() if e["type"] == "extra_forbidden" and tuple(e["loc"][:-1]) == parent]
        close = difflib.get_close_matches(name, unknown, n=1, cutoff=0.6)
        if close:
            msg += f" (did you mean {name}? {close[0]!r} is not a key)"
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "finite_number":
        msg = "must be a finite number (not nan or inf)"
    return f"{where}: {loc or 'recipe'}: {msg}"


def resolve_recipe_path(ref: str | Path) -> Path:
    """A path, or a bare recipe name looked up in the recipes directory."""
    path = Path(ref)
    if path.exists():
        return path
    if path.suffix == "" and (RECIPES_DIR / f"{path.name}.toml").exists():
        return RECIPES_DIR / f"{path.name}.toml"
    raise ToolkitError(f"recipe not found: {ref} (give a path to a .toml file or a name from `toolkit recipes`)")


def blamed(path: Path, overrides: list[str] | None, key: str) -> str:
    """Where a bad value of ``key`` came from: the ``--set`` that set it (or a key under it, or the
    table above it), else the recipe file."""
    for item in reversed(overrides or []):
        set_key = item.partition("=")[0].strip()
        if key and (key == set_key or key.startswith(set_key + ".") or set_key.startswith(key + ".")):
            return f"--set {shown(item)}"
    return str(path)


def parse_recipe(data: dict, path: Path, overrides: list[str] | None = None) -> Recipe:
    data = dict(data)
    data.setdefault("name", path.stem)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        line = format_validation_error(path, exc)
        key = line[len(str(path)) + 2:].partition(":")[0]
        raise ToolkitError(format_validation_error(blamed(path, overrides, key), exc)) from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``KEY=VALUE`` settings (``optimizer.lr=0.02``, ``data.augment.hflip=0.5``, ``model.options.dropout=0.1``)
    applied to a recipe's data. A value is read as a TOML value (numbers, true/false, [lists],
    "strings"); anything else is taken as a plain string (``scheduler.name=cosine``)."""
    data = dict(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(p.strip() for p in parts):
            raise ToolkitError(f"--set {shown(item)}: give KEY=VALUE with a dotted recipe key, e.g. --set optimizer.lr=0.02")
        try:
            document = tomllib.loads(f"v = {text.strip()}")
        except tomllib.TOMLDecodeError:
            document = {"v": text.strip()}
        except RecursionError:  # [[[[... nested thousands deep
            raise ToolkitError(f"--set {shown(item)}: the value is nested too deeply to be a recipe setting") from None
        if set(document) != {"v"}:  # 'x"\n[evil]\na=1': a value that is more than a value
            raise ToolkitError(f"--set {shown(item)}: the value is more than one TOML value (a new line, a table); give one value")
        value = document["v"]
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part, {})
            if not isinstance(child, dict):
                raise ToolkitError(f"--set {shown(item)}: {'.'.join(parts[: i + 1])} is a value, not a table of keys")
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return data


def load_recipe(ref: str | Path, overrides: list[str] | None = None) -> Recipe:
    """A recipe file or built-in name, with ``overrides`` (``apply_overrides``) applied before it is
    checked: an override is validated like the file, with the same one-line errors."""
    path = resolve_recipe_path(ref)
    with reading(path, "TOML recipe"):
        try:
            data = tomllib.loads(read_text_limited(path, "recipe", MAX_BYTES))
        except tomllib.TOMLDecodeError as exc:
            raise ToolkitError(f"{path}: not valid TOML ({first_line(exc)})") from None
    if overrides:
        data = apply_overrides(data, overrides)
        if isinstance(data.get("scheduler"), dict) and data["scheduler"].get("name") and any(o.startswith("scheduler.name=") for o in overrides):
            # another scheduler kind takes other keys: keep only what was set for it
            set_keys = {o.partition("=")[0].split(".", 1)[1] for o in overrides if o.startswith("scheduler.")}
            data["scheduler"] = {k: v for k, v in data["scheduler"].items() if k in set_keys}
    data = _with_folder_shape(data, path)
    inferred = data.pop("_inferred", None)
    recipe = parse_recipe(data, path, overrides)
    recipe._inferred = inferred
    # catch bad model options at load time, not at the first epoch
    with reading(path, "recipe"):
        classes = class_count(recipe)
        given = recipe._options().get("num_classes")
        if given is not None and given != classes:  # the loss would index past the model's outputs in the first step
            raise ToolkitError(f"{blamed(path, overrides, 'model.options.num_classes')}: model.options.num_classes = "
                f"{shown(given)}, but {recipe.data.dataset} has {classes} classes "
                               "(leave it out: the data set decides it)")
        try:
            model = recipe.build_model(num_classes=classes)
        except Exception as exc:  # noqa: BLE001 - whatever the options make the builder do, it is the recipe's fault
            raise ToolkitError(f"{blamed(path, overrides, 'model.options')}: model.options: {first_line(exc)}") from None
        if recipe.data.dataset == "folder":  # a size the model's fixed pooling cannot take fails here, not in epoch 1
            import torch

            try:
                with torch.no_grad():
                    model.eval()(torch.zeros(1, recipe.data.channels_in, recipe.data.size, recipe.data.size))
            except Exception as exc:  # noqa: BLE001
                raise ToolkitError(f"{path}: model {recipe.model.name!r} does not take {recipe.data.size}x{recipe.data.size} images "
                                   f"(data.size): {first_line(exc)}") from None
    return recipe


def _with_folder_shape(data: dict, path: Path) -> dict:
    """An image-folder recipe without ``size`` or ``channels``: both read from its training images
    (``toolkit.inference.folder.infer_shape``) and written into the recipe (so into the run's
    recipe.toml), with ``inferred`` saying how."""
    d = data.get("data")
    if not isinstance(d, dict) or d.get("dataset") != "folder" or not isinstance(d.get("root"), str) or ("size" in d and "channels" in d):
        return data
    from toolkit.inference.folder import infer_shape

    root = Path(d["root"]).expanduser()  # relative: to the working directory, as training reads it
    with reading(path, "recipe"):
        size, channels, how = infer_shape(root)
    found = {k: v for k, v in (("size", size), ("channels", channels)) if k not in d}
    said = f"{', '.join(f'data.{k} = {v}' for k, v in found.items())}: inferred from {root} ({how})"
    return {**data, "data": {**d, **found}, "_inferred": said}


def class_count(recipe: Recipe) -> int:
    """The number of classes a recipe's model answers; for an image folder, its class folders (2
    where the folder is not there yet: enough to check the model's options)."""
    if recipe.data.dataset != "folder":
        return facts(recipe.data.dataset).num_classes
    root = Path(recipe.data.root).expanduser()
    base = root / "train" if (root / "train").is_dir() and (root / "test").is_dir() else root
    try:
        found = [p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except OSError:
        found = []
    if len(found) >= 2:
        return len(found)
    return 2


def list_recipes(directory: Path = RECIPES_DIR) -> list[tuple[Path, Recipe]]:
    return [(p, load_recipe(p)) for p in sorted(directory.glob("*.toml"))]
