"""Any timm or open_clip backbone by name, its weights, and the one embedding interface.

What a name means is catalogue.py's job (`canonical_name`); this module builds the model, loads
its weights through the safe loaders, and takes everything about its input from the library:
input size, interpolation, mean/std, crop_pct and crop mode from timm's
`resolve_model_data_config` or open_clip's preprocess config, turned into the library's own eval
transform and run on the device exactly (preprocess.py). The embedding widths are the model's.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..device import autocast_dtype, resolve_precision
from ..errors import ConfigError, warn
from ..store.layout import LAYER_DATASETS
from .catalogue import RANDOM_PREFIX, Entry, canonical_name, parse_name  # noqa: F401 (canonical_name: re-exported)
from .dataset import DECODE_SIZE
from .hf_clip import arch_from_open_clip, build_open_clip_vision, load_hf_clip_folder
from .preprocess import DevicePreprocess
from .trunks import OpenClipTrunk, TimmTrunk
from .weights import (
    OPEN_CLIP_WEIGHT_FILES,
    WEIGHT_FILE_NAMES,
    WeightsError,
    check_state_dict_keys,
    find_weight_file,
    read_state_dict,
    resolve_weights,
    weights_identity,
)

HF_CLIP_EXTRA_FILES = ("config.json", "preprocessor_config.json")
OPEN_CLIP_CONFIG = "open_clip_config.json"
TIMM_WRAPPER_PREFIXES = ("module.", "model.")  # DataParallel / Lightning-style wrapping
OPEN_CLIP_VISUAL = "visual."
SEED = 0  # random weights are seeded, so a random backbone is the same on every load


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone name means (see catalogue.py); nothing is built or downloaded to know it."""

    name: str  # canonical
    library: str  # "timm" or "open_clip"
    model: str  # timm model name; open_clip config name or "hf-hub:<org>/<repo>"
    tag: str | None  # open_clip pretrained tag
    loader: str  # "library": the library's checkpoint format; "hf_clip": a transformers CLIPModel folder
    random_init: bool
    model_kwargs: dict[str, Any] = field(default_factory=dict, hash=False)
    entry: Entry | None = field(default=None, compare=False, hash=False)

    @property
    def default_weights(self) -> str | None:
        """Hub id of the published weights, where the catalogue or the library knows one."""
        if self.random_init:
            return None
        if self.entry is not None and self.entry.weights:
            return self.entry.weights
        if self.library == "timm":
            import timm

            cfg = timm.get_pretrained_cfg(self.model, allow_unregistered=True)
            return getattr(cfg, "hf_hub_id", None) or None
        if self.model.startswith("hf-hub:"):
            return self.model[len("hf-hub:"):]
        if self.tag:
            import open_clip

            return (open_clip.get_pretrained_cfg(self.model, self.tag).get("hf_hub") or "").rstrip("/") or None
        return None


@dataclass(frozen=True)
class LoadedSpec:
    """Everything the stored numbers depend on besides the weights: recorded and fingerprinted in the store."""

    name: str
    library: str
    model: str
    tag: str | None
    loader: str
    model_kwargs: dict
    random_init: bool
    architecture: dict  # the vision tower's config as built (open_clip / HF CLIP); timm: the model name
    data_config: dict  # what the library says about the input (timm data config / open_clip preprocess config)
    preprocessing: dict  # the eval transform as run (preprocess.Plan.record), for DECODE_SIZE views
    embed_dim: int  # width of "features"
    projected_dim: int | None  # width of "projected" (the image embedding), None when there is none
    layers: int = 0  # extract --layers K
    layer_dims: dict = field(default_factory=dict)  # "layers" / "patch_mean" -> width, when layers > 0

    @property
    def input_size(self) -> int:
        return self.preprocessing["input_size"][0]

    @property
    def output_dims(self) -> dict[str, int]:
        """Width of every dataset this backbone writes per view."""
        dims = {"features": self.embed_dim}
        if self.projected_dim:
            dims["projected"] = self.projected_dim
        return {**dims, **self.layer_dims}


def get_spec(name: str) -> BackboneSpec:
    parsed = parse_name(name)
    entry = parsed.entry
    return BackboneSpec(
        name=parsed.canonical,
        library=parsed.library,
        model=parsed.model,
        tag=parsed.tag,
        loader=entry.loader if entry is not None else "library",
        random_init=parsed.random_init,
        model_kwargs=dict(entry.model_kwargs) if entry is not None else {},
        entry=entry,
    )


def preprocessing_record(spec: LoadedSpec) -> dict:
    """How views become model input, for the feature store's metadata."""
    return {**spec.preprocessing, "data_config": spec.data_config}


def _no_autograd() -> AbstractContextManager:
    # inference_mode is the cheaper of the two, but torch.compile cannot trace through it
    return torch.no_grad() if torch.compiler.is_compiling() else torch.inference_mode()


class Embedder(nn.Module):
    """uint8 views -> {"features": (B, D)[, "projected"][, "layers", "patch_mean"]}, float32."""

    def __init__(self, spec: LoadedSpec, trunk: nn.Module, preprocess: DevicePreprocess):
        super().__init__()
        self.spec = spec
        self.trunk = trunk.eval()
        self.pre = preprocess
        self.precision = "fp32"  # "fp32", "bf16" or "fp16": what autocast computes in (load_backbone sets it)

    @property
    def device(self) -> torch.device:
        return self.pre.mean.device

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 (B, 3, H, W) -> the library's eval transform of each view, normalised (B, 3, S, S)."""
        return self.pre(images)

    def embed_pixels(self, pixels: Tensor) -> dict[str, Tensor]:
        """Embed already-normalised (B, 3, S, S) float pixels."""
        on_cuda = self.device.type == "cuda"
        pixels = pixels.to(self.device)
        if on_cuda:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        dtype = autocast_dtype(self.precision)  # None: plain float32
        with _no_autograd(), torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            out = self.trunk(pixels)
            out = {key: value.float() for key, value in out.items()}
        return out

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        with _no_autograd():
            return self.embed_pixels(self.preprocess(images))


@dataclass
class LoadedBackbone:
    embedder: Embedder
    weights_identity: dict | None  # JSON-serialisable: file sha256s, hub revision, or the random seed

    @property
    def spec(self) -> LoadedSpec:
        return self.embedder.spec

    @property
    def output_dims(self) -> dict[str, int]:
        return self.spec.output_dims


# ------------------------------------------------------------------------------------------ building


@dataclass
class _Built:
    tower: nn.Module  # timm model (num_classes=0) or open_clip vision tower
    transform: Any  # the library's eval transform (torchvision Compose of PIL steps)
    architecture: dict
    data_config: dict
    files: tuple = ()  # config files read besides the weights (their hashes join the weights identity)


def _seeded(build):
    # fork_rng leaves the caller's RNG alone; the seed makes random backbones identical on every load
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return build()


def _json(value):
    return value if isinstance(value, (str, int, float, bool, type(None))) else (
        [_json(v) for v in value] if isinstance(value, (list, tuple)) else
        {str(k): _json(v) for k, v in value.items()} if isinstance(value, dict) else str(value))


def _build_timm(spec: BackboneSpec) -> _Built:
    import timm
    from timm.data import create_transform, resolve_model_data_config

    if not timm.is_model(spec.model):
        close = timm.list_models(f"*{spec.model.split('.')[0][:12]}*")[:8]
        raise ConfigError(f"timm has no model {spec.model!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    kwargs = dict(spec.model_kwargs)
    overlay = kwargs.pop("pretrained_cfg_overlay", None)
    try:
        model = _seeded(lambda: timm.create_model(
            spec.model, pretrained=False, num_classes=0, pretrained_cfg_overlay=overlay, **kwargs))
    except RuntimeError as err:  # e.g. an unknown pretrained tag
        raise ConfigError(f"timm could not build {spec.model!r}: {err}") from err
    data_config = resolve_model_data_config(model)
    with torch.device("cpu"):  # the transform's constants stay real when the model is built on the meta device
        transform = create_transform(**data_config, is_training=False)
    return _Built(model, transform, {"timm_model": spec.model, "kwargs": _json(spec.model_kwargs)}, _json(data_config))


def _open_clip_config(spec: BackboneSpec, folder: Path | None) -> tuple[dict, dict, tuple]:
    """(model config, preprocess overrides, files read) of an open_clip name; hf-hub configs from `folder` or the hub."""
    import json

    import open_clip

    if spec.model.startswith("hf-hub:"):
        repo = spec.model[len("hf-hub:"):]
        path = folder / OPEN_CLIP_CONFIG if folder is not None else None
        if path is None or not path.is_file():
            if folder is not None:
                raise WeightsError(f"{folder} has no {OPEN_CLIP_CONFIG}; {spec.name} takes its architecture from it")
            try:
                path = Path(resolve_weights(repo, weight_files=(OPEN_CLIP_CONFIG,)).path) / OPEN_CLIP_CONFIG
            except WeightsError as err:
                raise ConfigError(f"{spec.name}: its architecture is in {repo}'s {OPEN_CLIP_CONFIG}, "
                                  f"which is not here ({err})") from err
        config = json.loads(path.read_text(encoding="utf-8"))
        if "model_cfg" not in config:
            raise WeightsError(f"{path} has no 'model_cfg'")
        return config["model_cfg"], config.get("preprocess_cfg", {}), (path,)
    model_cfg = open_clip.get_model_config(spec.model)
    if model_cfg is None:
        raise ConfigError(f"open_clip has no model config {spec.model!r} (see open_clip.list_models())")
    preprocess = {}
    if spec.tag:
        preprocess = open_clip.get_pretrained_cfg(spec.model, spec.tag)
        if not preprocess:
            tags = open_clip.list_pretrained_tags_by_model(spec.model)
            raise ConfigError(f"open_clip model {spec.model!r} has no pretrained tag {spec.tag!r}; "
                              f"its tags: {', '.join(tags) or 'none'}")
        if bool(preprocess.get("quick_gelu", False)) != bool(model_cfg.get("quick_gelu", False)):
            warn(f"the {spec.tag!r} weights of {spec.model} were trained with quick_gelu="
                 f"{preprocess.get('quick_gelu', False)}, unlike the {spec.model} config; open_clip has a "
                 "-quickgelu variant of the config for them")
    return model_cfg, preprocess, ()


def _build_open_clip(spec: BackboneSpec, folder: Path | None = None) -> _Built:
    from open_clip.model import _build_vision_tower
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    model_cfg, preprocess, files = _open_clip_config(spec, folder)
    model_cfg = {**model_cfg, **spec.model_kwargs}  # as open_clip's create_model applies overrides
    vision = {**model_cfg["vision_cfg"]}
    if vision.get("timm_model_name"):
        vision["timm_model_pretrained"] = False  # weights only ever come from --weights
    quick_gelu = model_cfg.get("quick_gelu", False)
    tower = _seeded(lambda: _build_vision_tower(model_cfg["embed_dim"], vision, quick_gelu=quick_gelu))
    # as create_model does: defaults, then the tag's (or hub config's) settings, then the tower's size
    pp = merge_preprocess_dict(asdict(PreprocessCfg()), preprocess)
    pp["size"] = tower.image_size
    pp = {k: v for k, v in pp.items() if k in PreprocessCfg.__dataclass_fields__}
    with torch.device("cpu"):  # as in _build_timm
        transform = image_transform_v2(PreprocessCfg(**pp), is_train=False)
    architecture = {k: v for k, v in model_cfg.items() if k != "text_cfg"}
    return _Built(tower, transform, _json(architecture), _json(pp), files)


def _hf_clip_preprocess(image_size: int, mean=None, std=None, interpolation=None):
    """open_clip's eval transform for a CLIP tower, with a transformers folder's own settings where it has them."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    pp = asdict(PreprocessCfg(size=image_size))
    pp.update({k: v for k, v in (("mean", mean), ("std", std), ("interpolation", interpolation)) if v is not None})
    with torch.device("cpu"):  # as in _build_timm
        return image_transform_v2(PreprocessCfg(**pp), is_train=False), _json(pp)


def _build_hf_clip_random(spec: BackboneSpec) -> _Built:
    arch = arch_from_open_clip(spec.model)
    tower = _seeded(lambda: build_open_clip_vision(arch))
    transform, pp = _hf_clip_preprocess(arch.image_size)
    return _Built(tower, transform, asdict(arch), pp)


def _load_hf_clip(spec: BackboneSpec, weights: str | Path, hash_weights: bool) -> tuple[_Built, dict | None]:
    source = resolve_weights(weights, weight_files=WEIGHT_FILE_NAMES, extra_files=HF_CLIP_EXTRA_FILES)
    ckpt = load_hf_clip_folder(source.path)
    transform, pp = _hf_clip_preprocess(ckpt.arch.image_size, ckpt.mean, ckpt.std, ckpt.interpolation)
    identity = weights_identity(source, ckpt.files) if hash_weights else None
    return _Built(ckpt.tower, transform, asdict(ckpt.arch), pp), identity


def _strip_prefix(state: dict[str, Tensor], prefixes: tuple[str, ...]) -> dict[str, Tensor]:
    for prefix in prefixes:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}
    return state


def _load_state(module: nn.Module, state: dict[str, Tensor], source: Path, what: str) -> None:
    check_state_dict_keys(expected=module.state_dict().keys(), found=state.keys(), source=str(source))
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:  # shape mismatches
        raise WeightsError(f"{source} does not fit {what}: {err}") from err


def _load_library(spec: BackboneSpec, weights: str | Path, hash_weights: bool) -> tuple[_Built, dict | None]:
    if spec.library == "timm":
        source = resolve_weights(weights, weight_files=WEIGHT_FILE_NAMES)
        path = find_weight_file(source.path) if source.path.is_dir() else source.path
        built = _build_timm(spec)
        state = _strip_prefix(read_state_dict(path), TIMM_WRAPPER_PREFIXES)
        classifier = built.tower.pretrained_cfg.get("classifier")
        for name in (classifier,) if isinstance(classifier, str) else classifier or ():
            # we keep pre-logits, so classification heads are not needed
            state = {k: v for k, v in state.items() if not k.startswith(f"{name}.")}
        _load_state(built.tower, state, path, spec.model)
        return built, weights_identity(source, [path]) if hash_weights else None
    extra = (OPEN_CLIP_CONFIG,) if spec.model.startswith("hf-hub:") else ()
    source = resolve_weights(weights, weight_files=OPEN_CLIP_WEIGHT_FILES, extra_files=extra)
    folder = source.path if source.path.is_dir() else None
    path = find_weight_file(source.path, OPEN_CLIP_WEIGHT_FILES + WEIGHT_FILE_NAMES) if folder else source.path
    built = _build_open_clip(spec, folder)
    # a whole open_clip model's checkpoint: its vision tower is under "visual." (text keys are not read)
    state = _strip_prefix(read_state_dict(path, prefix=OPEN_CLIP_VISUAL), ("module.", OPEN_CLIP_VISUAL))
    _load_state(built.tower, state, path, f"the {spec.model} vision tower")
    return built, weights_identity(source, [path, *built.files]) if hash_weights else None


def _missing_weights_error(spec: BackboneSpec) -> WeightsError:
    if spec.loader == "hf_clip":
        what = "a transformers CLIPModel folder"
    elif spec.library == "timm":
        what = "a timm checkpoint file or folder (model.safetensors)"
    else:
        what = f"an open_clip checkpoint file or folder ({', '.join(OPEN_CLIP_WEIGHT_FILES)})"
    published = spec.default_weights
    hint = (f" (a local copy of {published}), or --weights {spec.name}={published} to download it when online"
            if published else "")
    return WeightsError(
        f"backbone {spec.name!r} needs pretrained weights and will not run randomly initialised; pass "
        f"--weights {spec.name}=PATH with {what}{hint}; {RANDOM_PREFIX}{spec.name} runs it with random "
        "weights (tests and demos only)"
    )


def build_random(spec: BackboneSpec) -> _Built:
    """The architecture with seeded random weights (under `torch.device('meta')`: shapes only, no memory)."""
    if spec.loader == "hf_clip":
        return _build_hf_clip_random(spec)
    return _build_timm(spec) if spec.library == "timm" else _build_open_clip(spec)


def _trunk(spec: BackboneSpec, tower: nn.Module, layers: int) -> nn.Module:
    if spec.library == "timm":
        return TimmTrunk(tower, layers, spec.name)
    return OpenClipTrunk(tower, layers, spec.name)


def _library_width(spec: BackboneSpec, tower: nn.Module) -> int:
    """The width of "features" as the library states it (checked against a forward pass at load)."""
    model = tower.trunk if hasattr(tower, "trunk") else tower
    if hasattr(model, "num_features"):  # timm: the width of pre-logits
        return int(getattr(model, "head_hidden_size", None) or model.num_features)
    if hasattr(model, "transformer"):  # open_clip VisionTransformer: its width before the projection
        return int(model.transformer.width)
    return int(model.output_dim)


def _dry_run(embedder: Embedder, spec: BackboneSpec, layers: int) -> dict[str, int]:
    """Output widths from one forward pass of a blank view; --layers beyond the model's depth fails here."""
    blank = torch.zeros(1, 3, DECODE_SIZE, DECODE_SIZE, dtype=torch.uint8)
    try:
        out = embedder(blank)
    except (AssertionError, IndexError) as err:
        if layers:
            raise ConfigError(f"--layers {layers} does not fit {spec.name}: {err}") from err
        raise
    return {key: int(value.shape[-1]) for key, value in out.items()}


def make_embedder(spec: BackboneSpec, built: _Built, layers: int, device: str | torch.device) -> Embedder:
    trunk = _trunk(spec, built.tower, layers)
    preprocess = DevicePreprocess(built.transform, (DECODE_SIZE, DECODE_SIZE))
    width = _library_width(spec, built.tower)
    loaded = LoadedSpec(
        name=spec.name, library=spec.library, model=spec.model, tag=spec.tag, loader=spec.loader,
        model_kwargs=_json(spec.model_kwargs), random_init=spec.random_init, architecture=built.architecture,
        data_config=built.data_config, preprocessing=preprocess.plan.record(), embed_dim=width,
        projected_dim=None, layers=layers,
    )
    embedder = Embedder(loaded, trunk, preprocess).to(device)
    dims = _dry_run(embedder, spec, layers)
    if dims["features"] != width:
        raise ValueError(f"backbone {spec.name!r} outputs {dims['features']} features; its library says {width}")
    embedder.spec = replace(loaded, projected_dim=dims.get("projected"),
                            layer_dims={k: dims[k] for k in LAYER_DATASETS if k in dims})
    return embedder


def load_backbone(
    spec_or_name: BackboneSpec | str, weights: str | Path | None, device: str | torch.device = "cpu",
    *, precision: str = "auto", hash_weights: bool = True, layers: int = 0,
) -> LoadedBackbone:
    """Build a backbone and load its weights; real backbones refuse to run without weights.

    `precision`: see device.resolve_precision. `hash_weights=False` skips hashing the weight files
    (weights_identity is then None): torchrun processes other than rank 0 take rank 0's hashes.
    `layers` K > 0 adds the multi-layer outputs ("layers", "patch_mean"; see trunks.py).
    """
    spec = get_spec(spec_or_name) if isinstance(spec_or_name, str) else spec_or_name
    if layers < 0:
        raise ConfigError(f"--layers {layers}: give 0 (final features only) or a positive number of blocks")
    if spec.random_init:
        if weights is not None:
            raise WeightsError(f"backbone {spec.name!r} is randomly initialised by design and takes no weights")
        built, identity = build_random(spec), {"random_init": True, "seed": SEED}
    elif weights is None:
        raise _missing_weights_error(spec)
    elif spec.loader == "hf_clip":
        built, identity = _load_hf_clip(spec, weights, hash_weights)
    else:
        built, identity = _load_library(spec, weights, hash_weights)
    embedder = make_embedder(spec, built, layers, device)
    embedder.precision = resolve_precision(precision, embedder.device)
    if embedder.device.type == "cuda":
        embedder.trunk.to(memory_format=torch.channels_last)
    return LoadedBackbone(embedder.eval(), identity)


