"""The experiment networks (shapes, torch.fx tracing) and the Lightning Classifier on real digits."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import fx, nn

from experiments.data import DigitsDataModule
from experiments.models import ACTIVATIONS, CNN, MLP, AlexNetSmall, Classifier, ResNetSmall

IMAGE_SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
MODELS = {
    "mlp": lambda shape, k: MLP(shape, k, hidden=(32, 16)),
    "cnn": lambda shape, k: CNN(shape, k, channels=(8, 16), hidden=32),
    "alexnet": lambda shape, k: AlexNetSmall(shape, k, channels=(8, 16, 16, 16, 8), hidden=32),
    "resnet": lambda shape, k: ResNetSmall(shape, k, width=8, blocks=2),
}


def _trainer(**kw) -> pl.Trainer:
    args = dict(
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    args.update(kw)
    return pl.Trainer(**args)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*number of training batches.*")
        yield


@pytest.mark.parametrize("shape", IMAGE_SHAPES)
@pytest.mark.parametrize("name", list(MODELS))
def test_output_shape_and_fx_trace(name, shape):
    torch.manual_seed(0)
    model = MODELS[name](shape, 7).eval()
    assert model.input_shape == shape and model.num_classes == 7
    x = torch.randn(5, *shape)
    out = model(x)
    assert out.shape == (5, 7)
    traced = fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), out)


def test_default_sizes_on_digits_and_fashion_shapes():
    for shape in [(1, 8, 8), (1, 28, 28)]:
        for cls in (MLP, CNN, AlexNetSmall, ResNetSmall):
            model = cls(shape, 10).eval()
            assert model(torch.zeros(2, *shape)).shape == (2, 10)
            fx.symbolic_trace(model)


def test_alexnet_documented_feature_shapes():
    assert AlexNetSmall((1, 8, 8), 10).feature_shape == (64, 1, 1)
    assert AlexNetSmall((1, 28, 28), 10).feature_shape == (64, 2, 2)
    model = AlexNetSmall((1, 8, 8), 10)
    n_conv = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    n_pool = sum(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert (n_conv, n_linear, n_pool) == (5, 3, 3)
    assert any(isinstance(m, nn.Dropout) for m in model.modules())


def test_resnet_block_is_residual():
    model = ResNetSmall((1, 8, 8), 10, width=4, blocks=3)
    graph = fx.symbolic_trace(model).graph
    adds = [n for n in graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert len(adds) == 3


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_mlp_activations(activation):
    model = MLP((1, 40), 10, hidden=(8,), activation=activation)
    assert isinstance(model.net[2], ACTIVATIONS[activation])
    assert fx.symbolic_trace(model)(torch.randn(3, 1, 40)).shape == (3, 10)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="2-D"):
        CNN((1, 40), 10)
    with pytest.raises(ValueError, match="2-D"):
        ResNetSmall((16,), 10)
    with pytest.raises(ValueError, match="2-D"):
        AlexNetSmall((1, 40), 10)
    with pytest.raises(ValueError, match="too small"):
        CNN((1, 8, 8), 10, channels=(4, 4, 4, 4))
    with pytest.raises(ValueError, match="activation"):
        MLP((4,), 2, activation="swish2")


def test_hydra_style_list_arguments():
    from omegaconf import OmegaConf
    from hydra.utils import instantiate

    cfg = OmegaConf.create(
        {"_target_": "experiments.models.MLP", "input_shape": [1, 8, 8], "num_classes": 10, "hidden": [16, 8]}
    )
    model = instantiate(cfg)
    assert isinstance(model, MLP) and model.input_shape == (1, 8, 8)
    assert model(torch.zeros(1, 1, 8, 8)).shape == (1, 10)


def test_classifier_attributes():
    clf = Classifier(MLP((1, 8, 8), 10), lr=3e-3)
    assert clf.example_input_array.shape == (1, 1, 8, 8)
    assert clf.hparams.lr == 3e-3 and "net" not in clf.hparams
    torch.testing.assert_close(clf(torch.ones(2, 1, 8, 8)), clf.net(torch.ones(2, 1, 8, 8)))
    with pytest.raises(ValueError, match="input_shape"):
        Classifier(nn.Linear(3, 2))
    assert Classifier(nn.Linear(3, 2), input_shape=(3,), num_classes=2).example_input_array.shape == (1, 3)


@pytest.mark.parametrize("name", list(MODELS))
def test_classifier_trains_with_trainer_on_digits(name):
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=64, seed=0)
    clf = Classifier(MODELS[name](dm.input_shape, dm.num_classes), lr=1e-3)
    trainer = _trainer()
    trainer.fit(clf, datamodule=dm)
    metrics = trainer.callback_metrics
    for key in ("train/loss", "val/loss", "val/acc"):
        assert key in metrics and torch.isfinite(metrics[key])
    result = trainer.test(clf, datamodule=dm, verbose=False)
    assert 0.0 <= result[0]["test/acc"] <= 1.0


def _full_train_loss(clf: Classifier, dm: DigitsDataModule) -> float:
    x, y = dm.train_set.tensors
    clf.eval()
    with torch.no_grad():
        loss = float(F.cross_entropy(clf(x), y))
    clf.train()
    return loss


def test_mlp_loss_decreases_over_20_steps():
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=64, seed=0)
    dm.setup("fit")
    clf = Classifier(MLP(dm.input_shape, dm.num_classes), lr=3e-3)
    before = _full_train_loss(clf, dm)
    trainer = _trainer(max_epochs=-1, max_steps=20, limit_train_batches=None, limit_val_batches=0)
    trainer.fit(clf, datamodule=dm)
    assert trainer.global_step == 20
    after = _full_train_loss(clf, dm)
    assert after < 0.7 * before, (before, after)


class _WeightNormPenalty(nn.Module):
    """Stand-in for a Lipschitz penalty: any module returning a scalar when called with no args."""

    def __init__(self, net: nn.Module, weight: float = 1e-3) -> None:
        super().__init__()
        self._params = list(net.parameters())  # a plain list: not registered as submodule/params
        self.weight = weight

    def forward(self) -> torch.Tensor:
        return self.weight * sum((p**2).sum() for p in self._params)


def test_classifier_builds_the_penalty_on_its_net_and_adds_it_to_the_loss():
    torch.manual_seed(0)
    net = MLP((1, 8, 8), 10, hidden=(32,))
    clf = Classifier(net, lip_penalty=lambda n, example: _WeightNormPenalty(n))
    assert "lip_penalty" not in clf.hparams and clf.lip_penalty._params == list(net.parameters())
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        loss = clf.training_step((x, y), 0)
    torch.testing.assert_close(loss, F.cross_entropy(net(x), y) + clf.lip_penalty())
    assert clf.lip_penalty() > 0

