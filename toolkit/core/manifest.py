"""`exports/<run>/manifest.json`: the one description of an export that every reader uses.

It lists each artifact with format, precision, sha256 and size, and once for the whole
export the input spec, normalization, class names and the source checkpoint's sha256.
verify / bench / the demo read shapes, preprocessing and labels from here, never re-derive them.

A manifest is a file a user (or anyone) can edit, so ``Manifest.load`` checks it against the
schema below before anything reads it: types, finite numbers, bounded shapes, and artifact
names that stay inside the export directory (``files.confined``). Any failure is one line that
names the file and the field. The schema lives here, free of torch, because serving reads it too.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from toolkit.core.datasets import DATASETS
from toolkit.core.errors import ToolkitError, shown
from toolkit.core.parity import GATES
from toolkit.core.files import atomic_write, confined, finish_interrupted_swaps, name_problem, read_text_limited, reading, sha256_file, tree_digest

FORMAT = "toolkit-manifest/1"
MAX_BATCH = 256  # the default largest batch: Triton's max_batch_size, a TensorRT engine's profile, the v2 API's limit
# where an int8 file is meant to run (toolkit export --target)
TARGETS = ("cpu", "tensorrt")
# what each target's int8 file is, said at export and in the model card
TARGET_LINES = {
    "cpu": "int8 for CPUs: uint8 activations and int8 weights, the format ONNX Runtime's x86 kernels run fastest "
           "(--target tensorrt: TensorRT's symmetric int8)",
    "tensorrt": "int8 for TensorRT: symmetric int8 activations and weights with Q/DQ pairs (explicit quantization); it runs on "
                "ONNX Runtime too, slower than fp32 on its x86 CPU kernels",
}
NAME = "manifest.json"
MAX_BYTES = 16 << 20  # a manifest is a few KB; a larger file is not one
MAX_SIDE = 4096  # pixels a side of a model input
SHA256 = r"^[0-9a-f]{64}$"


class _Schema(BaseModel):
    # extra="allow": later stages add fields (parity, triton, ...) that older readers pass through
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


def _plain(value: str) -> str:
    problem = name_problem(value)
    if problem:
        raise ValueError(f"{value[:80]!r} {problem}; it must be a plain name")
    return value


PlainName = Annotated[str, AfterValidator(_plain)]  # a name that becomes a path: see files.confined


class InputSpec(_Schema):
    name: str = Field(min_length=1, max_length=200)
    # ['batch', C, H, W] for NCHW, ['batch', H, W, C] for NHWC
    shape: list[Any] = Field(min_length=4, max_length=4)
    # uint8: the graph takes raw pixels and normalizes them itself (`toolkit export --input uint8`)
    dtype: Literal["float32", "uint8"]
    layout: Literal["NCHW", "NHWC"]

    @field_validator("shape")
    @classmethod
    def _batch_then_sides(cls, shape: list) -> list:
        batch, *sides = shape
        if batch != "batch" or not all(type(d) is int and 1 <= d <= MAX_SIDE for d in sides):
            raise ValueError(f"must be ['batch', C, H, W] (or H, W, C for NHWC) with whole numbers from 1 to {MAX_SIDE}")
        return shape

    @property
    def chw(self) -> tuple[int, int, int]:
        """Channels, height, width, whatever the layout."""
        a, b, c = self.shape[1:]
        return (a, b, c) if self.layout == "NCHW" else (c, a, b)


class OutputSpec(_Schema):
    name: str = Field(min_length=1, max_length=200)
    shape: list[Any] = Field(min_length=2, max_length=2)


class Normalization(_Schema):
    scale: float = Field(gt=0)
    mean: list[float] = Field(min_length=1, max_length=4)
    std: list[float] = Field(min_length=1, max_length=4)

    @field_validator("std")
    @classmethod
    def _positive(cls, std: list[float]) -> list[float]:
        if any(s <= 0 for s in std):
            raise ValueError("every std must be greater than 0")
        return std


class FolderSource(_Schema):
    """Where an image-folder run's images are and how its test split was drawn (toolkit.inference.folder)."""

    root: str = Field(min_length=1, max_length=4096)
    split: float = Field(gt=0, lt=1)
    seed: int = Field(ge=0)


class Source(_Schema):
    checkpoint: str = Field(min_length=1, max_length=4096)
    sha256: str = Field(pattern=SHA256)
    recipe: PlainName
    params: int = Field(ge=0)
    test_acc: Optional[float] = None
    description: Optional[str] = Field(default=None, max_length=2000)
    epochs: Optional[int] = Field(default=None, ge=0)
    seed_results: Optional[dict[str, Any]] = None  # what the recipe's write-up reports (recipes.SeedResults)
    data_dir: Optional[str] = Field(default=None, max_length=4096)  # the data root training read (a default for later stages)
    folder: Optional[FolderSource] = None  # an image-folder dataset (toolkit.inference.folder): where its images are




class Gate(_Schema):
    delta_pp: float = Field(ge=0)
    agreement: float = Field(ge=0, le=100)


class Parity(_Schema):
    """One artifact's parity on one runtime, as ``toolkit verify`` measured it (percentages unrounded)."""

    accuracy: float
    delta_pp: float
    delta_ci_pp: Optional[Annotated[list[float], Field(min_length=2, max_length=2)]] = None  # Δ's 95% interval (manifests from before it lack it)
    agreement: float
    max_abs_logit_diff: float
    pipeline_agreement: Optional[float] = None  # manifests from before the image-file path lack it
    passed: bool
    gate: Optional[Gate] = None  # the gate it was held to (manifests from before it: the precision's default)

    def contradiction(self, precision: str, reference_acc: float | None) -> str | None:
        """Why a record that says ``passed`` cannot have passed, or None: its Δ or agreement outside its
        own gate, or a Δ that is not its accuracy minus the reference's."""
        if not self.passed:
            return None
        gate = self.gate or Gate(**GATES[precision])
        if abs(self.delta_pp) > gate.delta_pp + 1e-9:
            return f"its Δ {self.delta_pp:+.2f} pp is outside its gate of ±{gate.delta_pp:g} pp"
        if self.agreement < gate.agreement - 1e-9:
            return f"its agreement {self.agreement:.2f}% is below its gate's {gate.agreement:g}%"
        if reference_acc is not None and abs(self.accuracy - reference_acc - self.delta_pp) > 0.01:
            return f"its Δ {self.delta_pp:+.2f} pp is not its accuracy {self.accuracy:.2f}% minus the reference's {reference_acc:.2f}%"
        return None


class Verified(_Schema):
    """Where and on what the export's parity was measured: integer kernels differ between CPUs."""

    images: int = Field(ge=0)
    reference_acc: float
    machine: Optional[str] = None  # toolkit.core.environment.cpu_line(): vendor, model, integer-kernel features
    cpu_features: Optional[list[str]] = None
    onnxruntime: Optional[str] = None
    # sha256 of the parity.json this verification wrote: the manifest is verify's commit point
    report_sha256: Optional[str] = None


class Artifact(_Schema):
    file: PlainName
    format: Literal["onnx", "trt", "openvino", "executorch", "web"]  # "web": a folder (the browser's page), its sha256 files.tree_digest
    precision: Literal["fp32", "fp16", "int8"]
    sha256: str = Field(pattern=SHA256)
    bytes: int = Field(ge=0)
    created: Optional[str] = None
    parity: dict[str, Parity] = Field(default_factory=dict)  # runtime -> its result; cleared when the file changes
    # files that belong to this artifact beside it (an OpenVINO IR's weights), with their sha256
    companions: dict[PlainName, Annotated[str, Field(pattern=SHA256)]] = Field(default_factory=dict)
    # what the stage that wrote it records (opset, nodes, pad_channels, calibration, activations,
    # auto_fallback, built_for, max_batch, ...) passes through as extra fields

    @classmethod
    def of(cls, path: Path, fmt: str, precision: str, **extra) -> "Artifact":
        """The entry for a file (or a folder artifact) just written."""
        digest, size = tree_digest(path) if path.is_dir() else (sha256_file(path), path.stat().st_size)
        return cls(file=path.name, format=fmt, precision=precision, sha256=digest, bytes=size,
                   created=datetime.now(timezone.utc).isoformat(timespec="seconds"), **extra)

    def get(self, key: str, default: Any = None) -> Any:
        """An extra field a stage recorded (``pad_channels``, ``activations``, ...), or ``default``."""
        return (self.model_extra or {}).get(key, default)


class TritonModel(_Schema):
    name: PlainName
    source: PlainName


def triton_model_name(recipe: str, artifact: Artifact, inp: "InputSpec | None" = None) -> str:
    """A served artifact's model name, in the Triton repository and on `toolkit serve`'s v2 API:
    ``<recipe>_<precision>[_uint8][_nhwc][_trt]`` (the recipe name is a plain name: the schema checks
    it). ``<recipe>_fp32`` always takes float32 NCHW tensors: an input variant's name says its input."""
    variant = ("_uint8" if inp is not None and inp.dtype == "uint8" else "") + ("_nhwc" if inp is not None and inp.layout == "NHWC" else "")
    suffix = "_trt" if artifact.format == "trt" else ""
    return f"{recipe}_{artifact.precision}{variant}{suffix}".replace("-", "_")


class Triton(_Schema):
    repository: Literal["triton"]
    models: dict[str, TritonModel]

    @model_validator(mode="after")
    def _keys_are_names(self) -> "Triton":
        for key, model in self.models.items():
            if key != model.name:
                raise ValueError(f"model key {key[:80]!r} differs from its name {model.name[:80]!r}")
        return self


def _in_layout(chw: list[int], layout: str) -> list[int]:
    c, h, w = chw
    return [c, h, w] if layout == "NCHW" else [h, w, c]


def _format_error(path: Path, exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
    return f"{path}: {loc or 'manifest'}: {err['msg'].removeprefix('Value error, ')}"


class Manifest(_Schema):
    _contradictions: list[str] = PrivateAttr(default_factory=list)
    format: Literal["toolkit-manifest/1"]
    name: PlainName
    model: str = Field(min_length=1, max_length=200)
    dataset: str = Field(min_length=1, max_length=200)
    input: InputSpec
    output: OutputSpec
    normalization: Normalization
    classes: list[str] = Field(min_length=1, max_length=100_000)
    source: Source
    artifacts: list[Artifact]
    triton: Optional[Triton] = None
    parity: Optional[Verified] = None

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        """A dataset this version knows, or "folder": verify, bench, serve and predict all refuse the
        same manifests (serving would otherwise guess how to prepare images for it)."""
        known = (*DATASETS, "folder")
        if value not in known:
            raise ValueError(f"unknown dataset {shown(value)}; this version of toolkit knows {', '.join(known)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        channels = self.chw[0]
        if len(self.normalization.mean) != channels or len(self.normalization.std) != channels:
            raise ValueError(f"normalization needs one mean and one std per input channel ({channels})")
        if self.output.shape[1] != len(self.classes):
            raise ValueError(f"output has {self.output.shape[1]!r} classes, classes lists {len(self.classes)}")
        files = [a.file for a in self.artifacts]
        if len(set(files)) != len(files):
            raise ValueError("an artifact file is listed twice")
        # a record must agree with itself: a "passed" its own figures contradict is read as failed, and said
        reference = self.parity.reference_acc if self.parity is not None else None
        self._contradictions = []
        for art in self.artifacts:
            for runtime, parity in art.parity.items():
                why = parity.contradiction(art.precision, reference)
                if why:
                    parity.passed = False
                    self._contradictions.append(f"{art.file} ({runtime}): its parity record says passed, but {why}; "
                                                "treated as failed (run `toolkit verify` again)")
        return self

    @property
    def contradictions(self) -> list[str]:
        """One line per parity record that said passed against its own figures (now read as failed)."""
        return list(getattr(self, "_contradictions", []))

    @property
    def chw(self) -> tuple[int, int, int]:
        """The model input's channels, height and width."""
        return self.input.chw

    @classmethod
    def new(cls, ckpt: dict, name: str, input_dtype: str = "float32", layout: str = "NCHW") -> "Manifest":
        """A manifest with no artifacts yet, for the checkpoint ``ckpt`` (``checkpoint.load_checkpoint``)."""
        meta, recipe = ckpt["meta"], ckpt["recipe"]
        return cls(
            format=FORMAT,
            name=name,
            model=recipe["model"]["name"],
            dataset=meta["dataset"],
            input=InputSpec(name="input", shape=["batch", *_in_layout(meta["input_shape"], layout)], dtype=input_dtype, layout=layout),
            output=OutputSpec(name="logits", shape=["batch", len(meta["classes"])]),
            # a uint8 image x becomes ((x / 255) - mean) / std, per channel
            normalization=Normalization(scale=1 / 255, mean=[float(m) for m in meta["mean"]], std=[float(s) for s in meta["std"]]),
            classes=list(meta["classes"]),
            source=Source(checkpoint=str(Path(ckpt["path"]).resolve()), sha256=sha256_file(Path(ckpt["path"])), recipe=recipe["name"],
                          params=meta["params"], test_acc=meta.get("test_acc"), description=recipe.get("description") or None,
                          epochs=meta.get("epochs", recipe.get("epochs")), seed_results=recipe.get("seed_results"),
                          data_dir=meta.get("data_dir"), folder=meta.get("folder")),
            artifacts=[],
        )

    @classmethod
    def load(cls, export_dir: str | Path, verify_files: bool = True) -> "Manifest":
        """The export's manifest, checked against the schema; with ``verify_files``, every artifact's
        size and sha256 checked too. Anything wrong is one ToolkitError line naming the file."""
        export_dir = Path(export_dir)
        if not export_dir.exists():  # its only copy may lie aside: a swap killed between its two renames
            finish_interrupted_swaps(export_dir.parent, export_dir.name)
        path = confined(export_dir, NAME, str(export_dir))
        if not path.is_file():
            raise ToolkitError(f"no {NAME} in {export_dir} (run `toolkit export` first)")
        with reading(path, "toolkit manifest"):
            data = json.loads(read_text_limited(path, "manifest", MAX_BYTES))
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ToolkitError(f"{path}: not a toolkit manifest (no \"format\": \"{FORMAT}\")")
        try:
            manifest = cls.model_validate(data)
        except ValidationError as exc:
            raise ToolkitError(_format_error(path, exc)) from None
        if verify_files:
            for art in manifest.artifacts:
                f = manifest.path(export_dir, art)
                if art.format == "web":  # a folder
                    if not f.is_dir() or f.is_symlink():
                        raise ToolkitError(f"{path}: artifact {art.file} (a folder) is missing")
                    if tree_digest(f) != (art.sha256, art.bytes):
                        raise ToolkitError(f"{f}: its files do not match the manifest (changed or corrupted)")
                    continue
                if not f.is_file():
                    raise ToolkitError(f"{path}: artifact {art.file} is missing")
                if f.stat().st_size != art.bytes or sha256_file(f) != art.sha256:
                    raise ToolkitError(f"{f}: sha256 does not match the manifest (file changed or corrupted)")
                for name, digest in art.companions.items():
                    c = confined(export_dir, name, f"{path}: {art.file}'s companion file")
                    if not c.is_file():
                        raise ToolkitError(f"{path}: {art.file}'s companion file {name} is missing")
                    if sha256_file(c) != digest:
                        raise ToolkitError(f"{c}: sha256 does not match the manifest (file changed or corrupted)")
        return manifest

    def save(self, export_dir: str | Path) -> None:
        with atomic_write(Path(export_dir) / NAME, "w") as f:
            json.dump(self.model_dump(mode="json", exclude_none=True), f, indent=2)
            f.write("\n")

    def artifact(self, file: str) -> Optional[Artifact]:
        """The artifact whose file is ``file``, or None."""
        return next((a for a in self.artifacts if a.file == file), None)

    def upsert(self, artifact: Artifact) -> Artifact:
        """Replace the artifact with the same file name, or add it."""
        self.artifacts = [a for a in self.artifacts if a.file != artifact.file] + [artifact]
        return artifact

    @staticmethod
    def path(export_dir: str | Path, artifact: Artifact) -> Path:
        """Where an artifact the manifest lists lies: only ever inside ``export_dir``."""
        return confined(Path(export_dir), artifact.file, f"{Path(export_dir) / NAME}: artifact file")


def _is_main(export_dir: Path) -> bool:
    """A run's main export: its graphs take float32 NCHW tensors (not a ``--input uint8`` or ``--layout NHWC`` variant)."""
    try:
        spec = json.loads((export_dir / NAME).read_text()).get("input", {})
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(spec, dict) and spec.get("dtype") == "float32" and spec.get("layout", "NCHW") == "NCHW"


def latest_export(exports_dir: str | Path = "exports", say=None) -> Path:
    """The most recently written *main* export (float32 NCHW input; else, when there is none, the most
    recently written export of any kind). Staging copies (names starting with '.') never count.
    ``say`` hears which export it is."""
    finish_interrupted_swaps(Path(exports_dir))
    found = [p.parent for p in Path(exports_dir).glob(f"*/{NAME}") if not p.parent.name.startswith(".")]
    if not found:
        raise ToolkitError(f"no export under {exports_dir}/ (run `toolkit export` first, or pass an export directory)")
    main = [p for p in found if _is_main(p)]
    picked = max(main or found, key=lambda p: (p / NAME).stat().st_mtime)
    if say:
        variants = len(found) - len(main) if main else 0
        say(f"the latest {'main ' if main else ''}export: {picked}" + (f" ({variants} input variant(s) beside it: pass one to use it)" if variants else ""))
    return picked
