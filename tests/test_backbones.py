"""Backbones beyond medmeta's ResNets (issue 25): timm models and torchvision's AlexNet through the
one registry, their normalisation and input size, weights files, and every path of the protocol
and the supervised schemes on timm's tiny test models."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from medmeta.errors import ConfigError, MethodError
from medmeta.evaluation import run_protocol
from medmeta.learning.backbones import ImageAdapter
from medmeta.learning.models import ModelConfig, build_backbone

from .conftest import Synthetic, tiny_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import cdfsl  # noqa: E402
import supervised  # noqa: E402

TINY = ("test_vit", "test_resnet", "test_efficientnet")


@pytest.mark.parametrize("arch", [*TINY, "alexnet", "mobilenetv3_small_050"])
def test_every_backbone_maps_grey_and_rgb_images_to_features(arch: str) -> None:
    """mobilenetv3: its features come after a hidden head layer, wider than timm's ``num_features``."""
    torch.manual_seed(0)
    net = build_backbone(arch).eval()
    with torch.no_grad():
        grey, rgb = net(torch.rand(2, 1, 28, 28)), net(torch.rand(2, 3, 28, 28))
    assert grey.shape == rgb.shape == (2, net.out_features) and torch.isfinite(grey).all()
    grey_image = torch.rand(1, 1, 28, 28)
    with torch.no_grad():  # grey is the same image in three channels
        torch.testing.assert_close(net(grey_image), net(grey_image.expand(-1, 3, -1, -1)))


def test_the_normalisation_and_input_size_are_the_weights_own() -> None:
    net = build_backbone("test_vit")
    cfg = timm.create_model("test_vit").pretrained_cfg
    assert net.adapter.size == tuple(cfg["input_size"][1:]) == (160, 160)
    torch.testing.assert_close(net.adapter.mean.flatten(), torch.tensor(cfg["mean"]))
    torch.testing.assert_close(net.adapter.std.flatten(), torch.tensor(cfg["std"]))
    assert ModelConfig().input == "auto" and build_backbone("resnet18").adapter.mode == "native"


def test_pad_resize_and_native_inputs() -> None:
    x = torch.rand(1, 1, 28, 28)
    pad = ImageAdapter((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), (32, 32), "pad")(x)
    assert pad.shape == (1, 3, 32, 32)
    torch.testing.assert_close(pad[:, :, 2:30, 2:30], ((x - 0.5) / 0.25).expand(-1, 3, -1, -1))  # centred
    assert pad[:, :, :2].abs().sum() == 0 and pad[:, :, :, 30:].abs().sum() == 0  # zeros after normalisation
    assert ImageAdapter((0.5,) * 3, (0.25,) * 3, (32, 32), "resize")(x).shape == (1, 3, 32, 32)
    assert ImageAdapter((0.5,) * 3, (0.25,) * 3, (32, 32), "native")(x).shape == (1, 3, 28, 28)


def test_a_weights_file_round_trips_and_another_arch_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = build_backbone("test_vit").eval()
    x = torch.rand(3, 1, 28, 28)
    for name, state in (("own.pth", net.state_dict()), ("timm.pth", net.model.state_dict())):
        torch.save(state, tmp_path / name)
        with torch.no_grad():
            torch.testing.assert_close(build_backbone("test_vit", weights=tmp_path / name).eval()(x), net(x),
                                       rtol=0, atol=0)
    save_file(net.model.state_dict(), str(tmp_path / "timm.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(build_backbone("test_vit", weights=tmp_path / "timm.safetensors").eval()(x), net(x))
    with pytest.raises(ConfigError) as info:
        build_backbone("test_resnet", weights=tmp_path / "own.pth")
    message = str(info.value)
    assert "own.pth" in message and "does not fit test_resnet" in message and "key '" in message
    assert "\n" not in message


def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No hub to download from (as on this machine), without waiting for the network's retries."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))


def test_no_published_weights_offline_is_one_line_saying_how(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    offline(monkeypatch, tmp_path)
    with pytest.raises(MethodError, match="could not be had.*--weights FILE") as info:
        build_backbone("test_vit", weights="pretrained")
    assert "\n" not in str(info.value)


def test_unknown_and_2d_only_architectures_are_one_line(synthetic: Synthetic, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown architecture 'vit_nonsense'"):
        ModelConfig(arch="vit_nonsense")
    cfg = tiny_config(target="toyvolume", methods=["scratch"], **{"model.arch": "test_vit"})
    with pytest.raises(MethodError, match="toyvolume is 3D and test_vit a 2D architecture"):
        run_protocol(cfg, tmp_path / "out", root=tmp_path / "root", source_dir=str(synthetic.source_dir),
                     manifest=synthetic.manifest)


@pytest.mark.parametrize("arch", ["test_vit", "test_resnet"])
def test_every_method_runs_on_a_timm_backbone(synthetic: Synthetic, tmp_path: Path, arch: str) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "weights.pth"
    torch.save(build_backbone(arch).state_dict(), weights)
    methods = ["scratch", "pretrained+finetune", "pretrained+linear", "pretrained+knn", "pretrained+proto",
               "pretrained+lpft", "mmpt+linear", "maml", "imagenet+knn"]
    cfg = tiny_config(target="toyclass", methods=methods, **{"model.arch": arch, "model.weights": str(weights),
                      "episodes.count": 2, "episodes.queries": 2, "episodes.min_class_samples": None})
    results = run_protocol(cfg, tmp_path / "out", root=tmp_path / "root", source_dir=str(synthetic.source_dir),
                           manifest=synthetic.manifest)
    for name in methods:
        assert results["methods"][name]["summary"]["episodes"] == 2, name
    # pretrained and imagenet are the same initialisation: the same backbone from the same file
    assert results["config"]["model"]["arch"] == arch
    # The weights file's content is part of the cache key: another file reruns, the same reuses.
    again = run_protocol(cfg, tmp_path / "out", root=tmp_path / "root", source_dir=str(synthetic.source_dir),
                         manifest=synthetic.manifest)
    assert again["methods"]["pretrained+knn"] == results["methods"]["pretrained+knn"]
    torch.manual_seed(1)
    torch.save(build_backbone(arch).state_dict(), weights)
    other = run_protocol(cfg.replace(methods=["pretrained+knn"]), tmp_path / "out", root=tmp_path / "root",
                         source_dir=str(synthetic.source_dir), manifest=synthetic.manifest)
    assert other["methods"]["pretrained+knn"]["per_episode"] != results["methods"]["pretrained+knn"]["per_episode"]


def test_cdfsl_runs_pretrained_rules_from_a_local_timm_file(synthetic: Synthetic, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    weights = tmp_path / "vit.pth"
    torch.save(timm.create_model("test_vit", num_classes=0).state_dict(), weights)
    monkeypatch.setenv("MEDMETA_MANIFEST", str(synthetic.manifest_path))
    results = cdfsl.main(["--target", "toyclass", "--methods", "pretrained+knn,pretrained+linear", "--set",
                          "model.arch=test_vit", "--weights", str(weights), "--episodes", "2", "--set",
                          "episodes.queries=2", "--set", "episodes.min_class_samples=null", "--device", "cpu",
                          "--root", str(tmp_path / "root"), "--source-dir", str(synthetic.source_dir),
                          "--out", str(tmp_path / "out")])
    assert set(results["methods"]) == {"pretrained+knn", "pretrained+linear"}


def test_supervised_schemes_on_several_architectures(synthetic: Synthetic, tmp_path: Path, capsys,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDMETA_MANIFEST", str(synthetic.manifest_path))
    common = ["--dataset", "toyclass", "--seeds", "0", "--epochs", "1", "--device", "cpu", "--root",
              str(tmp_path / "root"), "--source-dir", str(synthetic.source_dir)]
    combined = supervised.main([*common, "--arch", "test_vit,test_resnet", "--schemes", "end2end,linear,knn",
                                "--init", "scratch", "--set", "train.batch_size=16", "--out", str(tmp_path / "out")])
    cells = {(r["arch"], r["scheme"]) for r in combined["table"]}
    assert cells == {(a, s) for a in ("test_vit", "test_resnet") for s in ("end2end", "linear", "knn")}
    assert all(r["init"] == "scratch" and 0 <= r["test_acc"] <= 1 for r in combined["table"])
    assert "test_vit (scratch)" in capsys.readouterr().out
    offline(monkeypatch, tmp_path)
    with pytest.raises(SystemExit) as info:  # pretrained, no weights to be had: one line saying how
        supervised.main([*common, "--arch", "test_vit", "--schemes", "linear", "--init", "pretrained",
                         "--out", str(tmp_path / "pre")])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and "--weights FILE" in err[-1]
    with pytest.raises(SystemExit):  # a weights file without --init pretrained is refused before any work
        supervised.main([*common, "--weights", "w.pth", "--out", str(tmp_path / "w")])
    assert "add --init pretrained" in capsys.readouterr().err


def test_mmpt_and_maml_start_from_pretrained_weights(synthetic: Synthetic, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from medmeta.methods import initialisations

    torch.manual_seed(3)
    file_net = build_backbone("test_resnet")
    weights = tmp_path / "weights.pth"
    torch.save(file_net.state_dict(), weights)
    starts: dict[str, dict] = {}
    for name, attr in (("mmpt", "MultiTaskPretrainer"), ("maml", "train_maml")):
        original = getattr(initialisations, attr)

        def spy(backbone, *args, _name=name, _original=original, **kwargs):
            starts[_name] = {k: v.clone() for k, v in backbone.state_dict().items()}
            return _original(backbone, *args, **kwargs)

        monkeypatch.setattr(initialisations, attr, spy)
    cfg = tiny_config(target="toyclass", methods=["mmpt+proto", "maml"],
                      **{"model.arch": "test_resnet", "model.weights": str(weights), "pretrain.init": "pretrained",
                         "maml.init": "pretrained", "episodes.count": 2, "episodes.queries": 2,
                         "episodes.min_class_samples": None})
    run_protocol(cfg, tmp_path / "out", root=tmp_path / "root", source_dir=str(synthetic.source_dir),
                 manifest=synthetic.manifest)
    for name in ("mmpt", "maml"):
        for k, v in file_net.state_dict().items():
            torch.testing.assert_close(starts[name][k], v, rtol=0, atol=0, msg=f"{name} {k}")
    folders = {p.name.split("-")[0]: p for p in (tmp_path / "out" / "pretrained").iterdir()}
    assert set(folders) == {"mmpt", "maml"}
    scratch = run_protocol(cfg.replace(pretrain=cfg.pretrain.replace(init="scratch"), methods=["mmpt+proto"]),
                           tmp_path / "out", root=tmp_path / "root", source_dir=str(synthetic.source_dir),
                           manifest=synthetic.manifest)
    assert len(list((tmp_path / "out" / "pretrained").glob("mmpt-*"))) == 2  # another start trains apart
    assert scratch["methods"]["mmpt+proto"]["settings"]["init"]["config"]["init"] == "scratch"


def test_a_canvas_replaces_the_weights_input_size() -> None:
    """MedMNIST+ pads every backbone to 224, whatever its pretrained config says (EfficientNet-B4
    320, SAM 1024): ``model.canvas`` is that size, for timm, torchvision and medmeta's models."""
    torch.manual_seed(0)
    net = build_backbone("test_resnet", input="pad", canvas=48).eval()  # its own input size is 160
    assert net.adapter.size == (48, 48)
    x = torch.rand(2, 1, 28, 28)
    padded = F.pad((x.expand(-1, 3, -1, -1) - net.adapter.mean) / net.adapter.std, (10, 10, 10, 10))
    with torch.no_grad():
        torch.testing.assert_close(net(x), net.model(padded))
    assert build_backbone("alexnet", input="pad", canvas=96).adapter.size == (96, 96)
    assert build_backbone("resnet18", input="resize", canvas=64).adapter.size == (64, 64)
    assert ModelConfig(arch="test_resnet", input="pad", canvas=224).canvas == 224
    with pytest.raises(ConfigError, match="model.canvas: a canvas of 224 needs model.input pad or resize"):
        ModelConfig(canvas=224)
    with pytest.raises(ConfigError, match="model.canvas: vit_tiny_patch16_224 takes only 224x224 images, not 96x96"):
        build_backbone("vit_tiny_patch16_224", input="pad", canvas=96)


def test_a_bad_weight_tag_and_native_input_on_a_fixed_size_model_are_one_line() -> None:
    with pytest.raises(ConfigError, match="vit_tiny_patch16_224 has no weight tag 'dinoo'; timm has vit_tiny"):
        ModelConfig(arch="vit_tiny_patch16_224.dinoo")
    with pytest.raises(ConfigError, match="takes only 224x224 images, so native input cannot work"):
        build_backbone("vit_tiny_patch16_224", input="native")
    assert build_backbone("test_vit", input="native").adapter.mode == "native"  # dynamic image size: fine
