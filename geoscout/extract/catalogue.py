"""What a backbone name means: the named entries, the library forms, and the one canonical name.

A backbone is named in one of four ways:
  - a named entry or its alias: `streetclip`, `dinov3-vitl16`, `tiny-clip` (see ENTRIES);
  - `timm:<model name>`: any timm model, e.g. `timm:vit_large_patch16_dinov3.lvd1689m`;
  - `open_clip:<model>[:<pretrained tag>]`: any open_clip vision tower, e.g.
    `open_clip:ViT-SO400M-16-SigLIP2-256:webli`, or `open_clip:hf-hub:<org>/<repo>` for a
    tower whose config lives in a hub repo (or in the folder given with --weights);
  - `random:<any of the above>`: the same architecture with seeded random weights (tests, demos).

`canonical_name` maps every spelling of one backbone to one name, and every command goes
through it, so a store extracted as `tiny-clip` is found again as `tiny-clip-random`, and one
extracted as `timm:vit_large_patch16_dinov3.lvd1689m` as `dinov3-vitl16`. Only the standard
library is imported here, so commands that merely read stores stay light.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

RANDOM_PREFIX = "random:"
LIBRARIES = ("timm", "open_clip")
OPEN_CLIP_HUB = "hf-hub:"
# Names end up in file names (see store.layout.store_key), so they keep to a safe alphabet.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._:/-]+$")


@dataclass(frozen=True)
class Entry:
    """A named backbone: a library form plus what the catalogue says about it."""

    name: str
    form: str  # "timm:<model>" or "open_clip:<model>[:<tag>]"
    summary: str
    licence: str  # of the published weights
    licence_source: str  # where the licence was read
    aliases: tuple[str, ...] = ()
    # hub id of the published weights where the library does not know it (timm's pretrained config
    # and open_clip's pretrained tags name theirs); a local copy is passed with --weights
    weights: str | None = None
    loader: str = "library"  # "library": the library's own checkpoint format; "hf_clip": a transformers CLIPModel folder
    random_init: bool = False  # tiny test architectures: seeded random weights, never loaded
    # constructor overrides (tiny architectures only); JSON values, as they are recorded in the store
    model_kwargs: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def is_alias_of_form(self) -> bool:
        """True when the entry is nothing but a name for its form (same model, same weights format)."""
        return self.loader == "library" and not self.random_init and not self.model_kwargs


ENTRIES: tuple[Entry, ...] = (
    Entry(
        name="streetclip",
        form="open_clip:ViT-L-14-336-quickgelu",
        summary="CLIP ViT-L/14 at 336 px fine-tuned on 1.1M street-level images for geolocation",
        licence="CC-BY-NC-4.0",
        licence_source="https://huggingface.co/geolocal/StreetCLIP (model card)",
        weights="geolocal/StreetCLIP",
        loader="hf_clip",
    ),
    Entry(
        name="convnextv2-large",
        form="timm:convnextv2_large.fcmae_ft_in22k_in1k_384",
        summary="ConvNeXt V2 Large, FCMAE pretrained, ImageNet-22k then 1k fine-tuned, 384 px",
        licence="CC-BY-NC-4.0",
        licence_source="timm pretrained config (license) / ConvNeXt V2 model card",
    ),
    Entry(
        name="dinov3-vitl16",
        form="timm:vit_large_patch16_dinov3.lvd1689m",
        summary="DINOv3 ViT-L/16 (self-supervised, LVD-1689M, distilled from the 7B), native 256 px",
        licence="DINOv3 License",
        licence_source="timm pretrained config (dinov3-license); https://ai.meta.com/resources/models-and-libraries/dinov3-license/",
    ),
    Entry(
        name="siglip2-so400m16-256",
        form="open_clip:ViT-SO400M-16-SigLIP2-256:webli",
        summary="SigLIP 2 So400m/16 image tower (sigmoid image-text, WebLI), native 256 px",
        licence="Apache-2.0",
        licence_source="https://huggingface.co/timm/ViT-SO400M-16-SigLIP2-256 (model card)",
    ),
    Entry(
        name="pe-core-l14-336",
        form="open_clip:PE-Core-L-14-336:meta",
        summary="Perception Encoder PE-Core-L/14 image tower (contrastive, distilled from PE-Core-G), 336 px",
        licence="Apache-2.0",
        licence_source="https://huggingface.co/facebook/PE-Core-L14-336 (model card)",
    ),
    Entry(
        name="tiny-clip-random",
        aliases=("tiny-clip",),
        form="open_clip:ViT-B-32-quickgelu",
        summary="a 2-block, 64-wide CLIP ViT at 64 px with random weights (tests and demos only)",
        licence="none",
        licence_source="-",
        random_init=True,
        model_kwargs={
            "embed_dim": 32,
            "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32, "mlp_ratio": 4.0},
        },
    ),
    Entry(
        name="tiny-convnext-random",
        aliases=("tiny-convnext",),
        form="timm:convnextv2_atto",
        summary="a 4-block ConvNeXt V2 at 64 px with random weights (tests and demos only)",
        licence="none",
        licence_source="-",
        random_init=True,
        model_kwargs={
            "depths": [1, 1, 1, 1],
            "dims": [16, 32, 64, 128],
            # timm's own way to change a model's data config: 64 px, whole image
            "pretrained_cfg_overlay": {"input_size": [3, 64, 64], "crop_pct": 1.0},
        },
    ),
)
ENTRY_BY_NAME: dict[str, Entry] = {e.name: e for e in ENTRIES}
_BY_ALIAS: dict[str, str] = {alias: e.name for e in ENTRIES for alias in e.aliases}
_BY_FORM: dict[str, str] = {e.form: e.name for e in ENTRIES if e.is_alias_of_form}


@dataclass(frozen=True)
class ParsedName:
    """A backbone name taken apart."""

    canonical: str
    library: str  # "timm" or "open_clip"
    model: str  # timm model name; open_clip config name or "hf-hub:<repo>"
    tag: str | None  # open_clip pretrained tag
    random_init: bool
    entry: Entry | None  # the named entry, when the name is one (or is its form)


def _forms_help() -> str:
    names = ", ".join(e.name for e in ENTRIES)
    aliases = ", ".join(f"{a} = {n}" for a, n in _BY_ALIAS.items())
    return (
        f"named entries: {names} (aliases: {aliases}); or timm:<model>, open_clip:<model>[:<tag>], "
        "open_clip:hf-hub:<org>/<repo>, each optionally prefixed random: (see `geoscout backbones`)"
    )


def _split_form(form: str, original: str) -> tuple[str, str, str | None]:
    library, sep, rest = form.partition(":")
    library = library.lower().replace("-", "_")
    if not sep or library not in LIBRARIES or not rest.strip():
        raise ConfigError(f"unknown backbone {original!r}; {_forms_help()}")
    rest = rest.strip()
    if library == "timm":
        return library, rest, None
    if rest.startswith("local-dir:"):  # a path in a backbone name would end up in store file names
        raise ConfigError(f"backbone {original!r}: name a local open_clip folder as open_clip:hf-hub:<org>/<repo> "
                          "(the repo it is a copy of) and pass the folder with --weights")
    if rest.startswith(OPEN_CLIP_HUB):
        if not rest[len(OPEN_CLIP_HUB):]:
            raise ConfigError(f"backbone {original!r}: no hub repo after {OPEN_CLIP_HUB!r}")
        return library, rest, None  # the hub repo's config holds everything; it has no tags
    model, _, tag = rest.partition(":")
    return library, model, (tag.lower() or None)  # open_clip looks tags up in lower case


def parse_name(name: str) -> ParsedName:
    """What a backbone name means, without importing any library (names are checked when loaded)."""
    original = name
    name = str(name).strip()
    if not name:
        raise ConfigError("empty backbone name")
    if not _SAFE_NAME.match(name):
        raise ConfigError(f"backbone name {original!r} has characters other than letters, digits and . _ - : /")
    random_init = name.lower().startswith(RANDOM_PREFIX)
    if random_init:
        name = name[len(RANDOM_PREFIX):]
    name = _BY_ALIAS.get(name, name)
    entry = ENTRY_BY_NAME.get(name)
    if entry is None:
        library, model, tag = _split_form(name, original)
        form = f"{library}:{model}" + (f":{tag}" if tag else "")
        entry = ENTRY_BY_NAME.get(_BY_FORM.get(form, ""))
    if entry is not None:
        library, model, tag = _split_form(entry.form, original)
        form = entry.name
    random_init = random_init or (entry is not None and entry.random_init)
    if entry is not None and entry.random_init:
        canonical = entry.name  # already random: random:tiny-clip is tiny-clip-random
    else:
        canonical = (RANDOM_PREFIX if random_init else "") + form
    return ParsedName(canonical, library, model, tag, random_init, entry)


def canonical_name(name: str) -> str:
    """The one name of a backbone, whatever alias or form it was given as; stores and heads use it."""
    return parse_name(name).canonical
