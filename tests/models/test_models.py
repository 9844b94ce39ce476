import pytest
import torch

from quicktrain import models

DATA_SHAPES = {"digits": (1, 8, 8), "fashion-mnist": (1, 28, 28), "cifar": (3, 32, 32)}
TV_QUICK = ["resnet18", "mobilenet_v3_small", "squeezenet1_0", "efficientnet_b0"]


def _forward_backward(name, data_shape, num_classes=10):
    shape = models.input_shape(name, data_shape)
    model = models.get_model(name, num_classes=num_classes, in_shape=shape)
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, num_classes) and torch.isfinite(out).all()
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    return model


@pytest.mark.parametrize("data_shape", DATA_SHAPES.values(), ids=DATA_SHAPES.keys())
@pytest.mark.parametrize("name", models.list_models())
def test_registry_models_build_and_train_on_each_data_shape(name, data_shape):
    _forward_backward(name, data_shape)


@pytest.mark.parametrize("name", TV_QUICK)
def test_torchvision_models_adapt_to_small_grey_images(name):
    assert models.input_shape(f"tv:{name}", (1, 8, 8)) == (3, 32, 32)
    _forward_backward(f"tv:{name}", (1, 8, 8), num_classes=7)


@pytest.mark.slow
@pytest.mark.parametrize("name", models.list_torchvision_models())
def test_every_torchvision_classifier_builds_for_digits(name):
    shape = models.input_shape(f"tv:{name}", (1, 8, 8))
    model = models.get_model(f"tv:{name}", num_classes=10, in_shape=shape).eval()
    with torch.no_grad():
        assert model(torch.randn(1, *shape)).shape == (1, 10)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown model 'resnet21'; choose from \[.*'resnet20'"):
        models.get_model("resnet21", num_classes=10, in_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=r"Unknown torchvision model 'resnet19'.*'resnet18'"):
        models.input_shape("tv:resnet19", (1, 8, 8))


def test_wrong_input_shape_and_duplicate_registration_raise():
    with pytest.raises(ValueError, match=r"needs inputs of shape \(3, 32, 32\)"):
        models.get_model("tv:resnet18", num_classes=10, in_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="already registered"):
        models.register_model("cnn")(lambda **kw: None)


def test_parameter_counts_match_the_published_sizes():
    count = lambda name: sum(  # noqa: E731
        p.numel() for p in models.get_model(name, num_classes=10, in_shape=(3, 32, 32)).parameters()
    )
    assert count("resnet20") == 272_474  # He et al. 2016 report 0.27 M
    assert 380_000 < count("mobilenetv2_tiny") < 420_000
