"""End to end: real ``pl.Trainer`` fits on the blobs data (CPU) with ``LipschitzCallback`` / ``LipschitzPenalty``.

* the scalars in the TensorBoard event files equal an independent recomputation from the weights saved at each
  step (converged values within 1e-4; certified >= the exact product of dense-Jacobian norms >= the estimate);
* the penalty's measured effect (bound at least 2x lower at the same accuracy);
* the callback observes: with it, a penalised fit gives bitwise the same weights and warm state as without it
  (accumulation, bf16 autocast);
* kill-and-resume is bitwise (weights and warm state);
* a NaN weight mid-training: warning, penalty skipped, no NaN gradient, training goes on.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lipreg import LipschitzEstimator
from lipreg.lightning import LipschitzCallback
from lipreg.penalty import LipschitzPenalty
from tests.classifiers import CNN, EXAMPLE, MLP, BlobsData, Classifier

pytestmark = pytest.mark.slow


def trainer_for(tmp_path: Path | None, callbacks: list[Callback], **overrides: Any) -> pl.Trainer:
    options: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_epochs=1, num_sanity_val_steps=0, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
        logger=TensorBoardLogger(tmp_path, name="", version=0) if tmp_path is not None else False)
    options.update(overrides)
    return pl.Trainer(callbacks=callbacks, **options)


def make_net(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(hidden=(32, 32)) if kind == "mlp" else CNN(channels=(8, 16), hidden=32)


def segments(net: nn.Module) -> list[nn.Module]:
    """The operators AutoLip multiplies (conv + eval batch norm fused, flatten + linear), ReLU and the 2x2 max
    pooling (no overlap) being 1-Lipschitz."""
    if isinstance(net, MLP):
        return [nn.Sequential(net.net[0], net.net[1]), net.net[3], net.net[5]]
    f, c = net.features, net.classifier
    return [nn.Sequential(f[0], f[1]), nn.Sequential(f[4], f[5]), nn.Sequential(c[0], c[1]), c[3]]


def jacobian_lower(net: nn.Module, n: int = 16) -> float:
    """The largest local Jacobian norm (float64, eval mode) over ``n`` random inputs: a lower bound."""
    net = copy.deepcopy(net).double().eval()
    generator = torch.Generator().manual_seed(0)
    xs = torch.rand(n, *EXAMPLE.shape[1:], dtype=torch.float64, generator=generator)
    return max(torch.linalg.matrix_norm(torch.func.jacrev(net)(x[None]).reshape(-1, x.numel()), ord=2).item()
               for x in xs)


def exact_autolip(net: nn.Module) -> float:
    """The exact AutoLip value: the product of the spectral norms of the dense Jacobians (``torch.func.jacrev``, in
    float64, eval mode) of the linear operators."""
    net = copy.deepcopy(net).double().eval()
    parts = segments(net)
    shapes: list[torch.Size] = []
    hooks = [(p[0] if isinstance(p, nn.Sequential) else p).register_forward_pre_hook(
        lambda m, args: shapes.append(args[0].shape[1:])) for p in parts]
    with torch.no_grad():
        net(EXAMPLE.double())
    for hook in hooks:
        hook.remove()
    bound = 1.0
    for part, shape in zip(parts, shapes):
        z = torch.zeros(1, *shape, dtype=torch.float64)
        jacobian = torch.func.jacrev(part)(z).reshape(-1, shape.numel())
        bound *= torch.linalg.matrix_norm(jacobian, ord=2).item()
    return bound


class Snapshots(Callback):
    """The net's weights after every optimizer step (keyed by the step Lightning logs it under), and the
    validation batches of the last validation epoch."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.val_batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.weights[trainer.global_step - 1] = copy.deepcopy(pl_module.net.state_dict())

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.val_batches = []

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, *args: Any) -> None:
        self.val_batches.append((batch[0].clone(), batch[1].clone()))


def read_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def loaded(kind: str, state: dict[str, torch.Tensor]) -> nn.Module:
    net = make_net(kind)
    net.load_state_dict(state)
    return net


def certified_accuracy(net: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], bound: float,
                       eps: float) -> float:
    """Tsuzuku et al.: correct, with a margin above sqrt(2) L eps (written out here, not the metric)."""
    net = copy.deepcopy(net).eval()
    hits, total = 0, 0
    with torch.no_grad():
        for x, y in batches:
            logits = net(x)
            true = logits.gather(1, y[:, None]).squeeze(1)
            runner_up = logits.scatter(1, y[:, None], float("-inf")).max(dim=1).values
            hits += int((true - runner_up > math.sqrt(2.0) * bound * eps).sum())
            total += len(y)
    return hits / total


# --------------------------------------------------------------------------- logged values vs recomputation
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_logged_bounds_equal_an_independent_recomputation(tmp_path: Path, kind: str) -> None:
    """5 steps per epoch, 2 epochs: the bound logged every 3 steps, certified every 2, validation (converged values)
    after steps 4 and 9. Every ``lipschitz/*`` scalar is checked against the weights saved at its step."""
    pl.seed_everything(0)
    model = Classifier(make_net(kind), lr=1e-2)
    lip = LipschitzCallback(log_every_n_steps=3, certify_every_n_steps=2, per_layer=True, eval_n_iter=3000,
                            robust_eps=(0.05,), lower_bound_batches=2)
    snapshots = Snapshots()
    trainer = trainer_for(tmp_path, [lip, snapshots], max_epochs=2, limit_train_batches=5, limit_val_batches=2,
                          log_every_n_steps=3)
    trainer.fit(model, BlobsData(batch_size=64))
    scalars = read_scalars(trainer.logger.log_dir)
    exact = {step: exact_autolip(loaded(kind, w)) for step, w in snapshots.weights.items()}
    val_steps, last = (4, 9), 9

    # at the step Lightning logs its own metrics under (per-layer values: only at the log steps)
    layer_tags = [tag for tag in scalars if tag.startswith("lipschitz/layer/")]
    assert layer_tags and all({s for s, _ in scalars[tag]} == {2, 5, 8} for tag in layer_tags)
    assert {s for s, _ in scalars["train/loss"]} == {2, 5, 8}
    assert {s for s, _ in scalars["lipschitz/autolip"]} == {2, 5, 8} | {1, 3, 5, 7, 9} | set(val_steps)
    # every certified value (step-level every 2 steps, and at each validation) is the tightest certificate: never
    # above the exact AutoLip value, never below a local Jacobian norm of the weights of its step
    certified = scalars["lipschitz/autolip_certified"]
    assert sorted({s for s, _ in certified}) == [1, 3, 4, 5, 7, 9]
    for step, value in certified:
        lower = jacobian_lower(loaded(kind, snapshots.weights[step]))
        assert lower <= value <= exact[step] * (1 + 1e-5), (step, lower, value, exact[step])
    # every estimate (warm or converged) is <= the exact AutoLip value at its step
    for step, value in scalars["lipschitz/autolip"]:
        assert value <= exact[step] * (1 + 1e-6), (step, value, exact[step])
    for step, gap_percent in scalars["lipschitz/gap_percent"]:  # 100 (certified / estimate - 1), < 0 when tighter
        assert gap_percent <= 100.0 * (lip.reconverge_gap * (1 + 1e-6) - 1.0)
    # per layer: the linear factors are power-method values of their operator (the constant ones, 1 here, not logged)
    layers = {tag.removeprefix("lipschitz/layer/"): scalars[tag] for tag in layer_tags}
    assert set(layers) == set(lip.estimator.linear_operators())
    assert math.prod(v for name, values in layers.items() for s, v in values if s == 2) == pytest.approx(
        dict(scalars["lipschitz/autolip"])[2], rel=1e-5)

    # validation: the converged values on the final weights (the last event of each tag at the last step)
    final = {tag: [v for s, v in values if s == last][-1] for tag, values in scalars.items()
             if any(s == last for s, _ in values)}
    net = loaded(kind, snapshots.weights[last])
    fresh = LipschitzEstimator(net, EXAMPLE).converge(tol=1e-9, max_iter=20000).item()
    assert final["lipschitz/autolip"] == pytest.approx(fresh, rel=1e-4)
    assert 0 < final["lipschitz/lower"] <= final["lipschitz/autolip_certified"] <= exact[last] * (1 + 1e-5)
    assert final["lipschitz/upper_over_lower"] == pytest.approx(
        final["lipschitz/autolip_certified"] / final["lipschitz/lower"], rel=1e-6)
    assert final["robust/certified_acc@0.05"] == pytest.approx(
        certified_accuracy(net, snapshots.val_batches, final["lipschitz/autolip_certified"], 0.05), abs=1e-6)
    assert sum(len(y) for _, y in snapshots.val_batches) == 128
    # no copies of the metrics for the HPARAMS tab (it reads the scalars), and the bar chart
    assert not [tag for tag in scalars if tag.startswith(("hp/", "hp_metric"))]
    images = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0})
    images.Reload()
    assert [e.step for e in images.Images("lipschitz/layers")] == [5, 10]


# --------------------------------------------------------------------------- the penalty's effect
def train_for_effect(coefficient: float) -> dict[str, float]:
    pl.seed_everything(0)
    net = MLP(hidden=(64, 64))
    penalty = LipschitzPenalty(net, EXAMPLE, coefficient=coefficient, kind="log") if coefficient else None
    model = Classifier(net, lr=1e-2, lip_penalty=penalty)
    lip = LipschitzCallback(module="net", log_every_n_steps=1000, certify_every_n_steps=0, robust_eps=(0.1,))
    trainer = trainer_for(None, [lip], max_epochs=8, check_val_every_n_epoch=8)
    trainer.fit(model, BlobsData(batch_size=64))
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_penalty_lowers_the_bound_at_the_same_accuracy() -> None:
    """Same seed, data order and budget (8 epochs, MLP 64-64 on blobs); ``log`` penalty of coefficient 0.3. (Its
    effect on the certified accuracy is measured on real digits: ``tests/experiments/test_penalty_effect.py``.)"""
    plain, penalised = train_for_effect(0.0), train_for_effect(0.3)
    bound = "lipschitz/autolip_certified"
    assert penalised[bound] * 2 <= plain[bound]
    assert penalised["val/acc"] >= plain["val/acc"] - 0.02 and penalised["val/acc"] > 0.9


# --------------------------------------------------------------------------- the callback only observes
def fit_penalised(observed: bool, **trainer_options: Any) -> tuple[Classifier, dict[str, torch.Tensor]]:
    pl.seed_everything(0)
    net = make_net("mlp")
    model = Classifier(net, lr=1e-2, lip_penalty=LipschitzPenalty(net, EXAMPLE, coefficient=0.5, kind="log"))
    callbacks = [LipschitzCallback(module="net", log_every_n_steps=1, per_layer=True, certify_every_n_steps=0)
                 ] if observed else []
    trainer = trainer_for(None, callbacks, limit_train_batches=6, limit_val_batches=0, **trainer_options)
    trainer.fit(model, BlobsData(batch_size=32))
    return model, model.lip_penalty.estimator.state_dict()


@pytest.mark.parametrize("options", [{"accumulate_grad_batches": 2}, {"precision": "bf16-mixed"},
                                     {"accumulate_grad_batches": 2, "precision": "bf16-mixed"}],
                         ids=["accumulate2", "bf16", "accumulate2-bf16"])
def test_the_callback_changes_no_update_of_a_penalised_fit(options: dict[str, Any]) -> None:
    """The callback shares the penalty's estimator and logs its bound at every step, yet the weights and the warm
    state are bitwise those of the same fit without it: it never iterates a penalty's warm state when it logs (only
    a re-convergence before a certificate or a validation epoch moves it, to the top singular vectors)."""
    alone, alone_warm = fit_penalised(False, **options)
    observed, observed_warm = fit_penalised(True, **options)
    for name, value in alone.net.state_dict().items():
        assert torch.equal(value, observed.net.state_dict()[name]), name
    assert alone_warm.keys() == observed_warm.keys()
    for name, value in alone_warm.items():
        assert torch.equal(value, observed_warm[name]), name


# --------------------------------------------------------------------------- kill and resume
class BatchOrder(Callback):
    def __init__(self) -> None:
        self.labels: dict[int, list[list[int]]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.labels.setdefault(trainer.current_epoch, []).append(batch[1].tolist())


def fit_for_resume(tmp_path: Path, data: BlobsData, penalty_on_module: bool, ckpt_path: str | None = None,
                   ) -> tuple[Classifier, LipschitzCallback, BatchOrder]:
    pl.seed_everything(0 if ckpt_path is None else 123)  # a resumed run gets everything from the checkpoint
    net = make_net("mlp", seed=0 if ckpt_path is None else 123)
    penalty = LipschitzPenalty(net, EXAMPLE, coefficient=0.3) if penalty_on_module else None
    model = Classifier(net, lr=1e-2, lip_penalty=penalty)
    lip = LipschitzCallback(module="net", log_every_n_steps=2, certify_every_n_steps=3, reconverge_gap=1.0001)
    order = BatchOrder()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    trainer = trainer_for(tmp_path, [lip, order, checkpoints], max_epochs=2, limit_train_batches=4,
                          limit_val_batches=1, enable_checkpointing=True)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model, lip, order


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
@pytest.mark.parametrize("penalty_on_module", [False, True], ids=["callback-estimator", "module-penalty"])
def test_kill_and_resume_is_bitwise(tmp_path: Path, penalty_on_module: bool) -> None:
    """2 epochs straight vs resuming the same run's end-of-epoch-1 checkpoint into fresh objects (another seed):
    bitwise the same weights, optimizer-driven updates, warm vectors (in the module or in the callback's state)."""
    straight, straight_lip, straight_order = fit_for_resume(tmp_path / "a", BlobsData(batch_size=64),
                                                            penalty_on_module)
    resumed, resumed_lip, resumed_order = fit_for_resume(
        tmp_path / "b", BlobsData(batch_size=64), penalty_on_module,
        ckpt_path=str(tmp_path / "a" / "ckpt" / "epoch=0.ckpt"))
    assert resumed_order.labels[1] == straight_order.labels[1] and list(resumed_order.labels) == [1]
    straight_state, resumed_state = straight.state_dict(), resumed.state_dict()
    assert straight_state.keys() == resumed_state.keys()
    for name, value in straight_state.items():
        assert torch.equal(value, resumed_state[name]), name
    if penalty_on_module:
        assert resumed_lip.estimator is resumed.lip_penalty.estimator
    for name, value in straight_lip.estimator.state_dict().items():
        assert torch.equal(value, resumed_lip.estimator.state_dict()[name]), name
    assert straight_lip.state_dict().keys() == resumed_lip.state_dict().keys()
    for name, value in straight_lip.state_dict().get("estimator", {}).items():
        assert torch.equal(value, resumed_lip.state_dict()["estimator"][name]), name


# --------------------------------------------------------------------------- NaN weight mid-training
class CleanTaskClassifier(Classifier):
    """While ``clean`` is set, the forward (the task loss) uses it in place of the injected weight: only the
    Lipschitz penalty sees the NaN, so any NaN in a gradient would come from the penalty."""

    clean: dict[str, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clean is None:
            return self.net(x)
        return torch.func.functional_call(self.net, {**dict(self.net.named_parameters()), **self.clean}, (x,))


class InjectNaN(Callback):
    """Writes NaN into ``net.net.1.weight`` before step ``step``'s forward; records the gradients at that step;
    repairs the weight after every other callback saw the step (the Lipschitz callback logged on the NaN weights)."""

    name = "net.1.weight"

    def __init__(self, step: int) -> None:
        self.step = step
        self.grads: dict[str, torch.Tensor | None] = {}
        self.warm_at_nan: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: CleanTaskClassifier, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_step == self.step:
            weight = pl_module.net.get_parameter(self.name)
            pl_module.clean = {self.name: weight.detach().clone()}
            with torch.no_grad():
                weight[0, 0] = float("nan")

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: CleanTaskClassifier, optimizer: Any) -> None:
        if trainer.global_step == self.step:
            self.grads = {n: None if p.grad is None else p.grad.clone() for n, p in pl_module.net.named_parameters()}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: CleanTaskClassifier, *args: Any) -> None:
        if trainer.global_step == self.step + 1:
            estimators = [m for m in pl_module.modules() if isinstance(m, LipschitzEstimator)]
            lip = [c for c in trainer.callbacks if isinstance(c, LipschitzCallback)][0]
            self.warm_at_nan = {k: v.clone() for k, v in (estimators or [lip.estimator])[0].state_dict().items()}
            with torch.no_grad():
                pl_module.net.get_parameter(self.name).copy_(pl_module.clean[self.name])
            pl_module.clean = None


def test_nan_weight_skips_the_penalty_and_training_goes_on(tmp_path: Path) -> None:
    pl.seed_everything(0)
    net = make_net("mlp")
    model = CleanTaskClassifier(net, lr=1e-2, lip_penalty=LipschitzPenalty(net, EXAMPLE, coefficient=0.3))
    # module="net": the bounded map is the net with its (NaN) weights; the classifier's forward, which swaps in the
    # clean weight, is not what the penalty bounds (and the capture refuses it: its graph does not compute it)
    lip = LipschitzCallback(module="net", log_every_n_steps=1, certify_every_n_steps=1)
    inject = InjectNaN(step=3)
    trainer = trainer_for(tmp_path, [lip, inject], max_epochs=1, limit_train_batches=6, limit_val_batches=1)
    with pytest.warns(RuntimeWarning) as record:
        trainer.fit(model, BlobsData(batch_size=32))
    assert any("penalty is skipped" in str(w.message) for w in record)

    assert trainer.global_step == 6  # training went on
    nan_grad = inject.grads[InjectNaN.name]  # only the (skipped) penalty could have given it one: exactly 0
    assert nan_grad is not None and torch.equal(nan_grad, torch.zeros_like(nan_grad))
    others = {n: g for n, g in inject.grads.items() if n != InjectNaN.name}
    assert all(g is not None and torch.isfinite(g).all() for g in others.values()), others
    assert all(torch.isfinite(b).all() for b in inject.warm_at_nan.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(b).all() for b in lip.estimator.buffers())
    scalars = read_scalars(trainer.logger.log_dir)
    assert math.isnan(dict(scalars["lipschitz/autolip"])[3])  # logged as it was: NaN, and no certificate
    assert sorted(s for s, _ in scalars["lipschitz/autolip_certified"]) == [0, 1, 2, 4, 5, 5]
    assert all(math.isfinite(v) for _, v in scalars["lipschitz/autolip_certified"])
    assert math.isfinite(float(trainer.callback_metrics["lipschitz/autolip_certified"]))
