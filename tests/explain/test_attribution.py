import numpy as np
import pytest
import torch
from captum.attr import (
    DeepLift,
    DeepLiftShap,
    FeatureAblation,
    GradientShap,
    InputXGradient,
    IntegratedGradients,
    LayerGradCam,
    LayerIntegratedGradients,
    Occlusion,
    Saliency,
    ShapleyValueSampling,
)
from captum.metrics import infidelity

from lightning_trust.demo import SmallCNN, TabularMLP
from lightning_trust.explain import METHODS, AdversarialRobustness, Attribution, rank_correlation
from lightning_trust.explain.methods import gaussian_blur
from lightning_trust.explain.sample import stratified_indices
from tests.explain.helpers import BagOfEmbeddings, DigitsSubset, StubTrainer, Synthetic, Tokens
from tests.support import AdultSubset, trainer


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return SmallCNN(channels=[8, 16]).eval()


@pytest.fixture(scope="module")
def digits_small(digits):
    return DigitsSubset(digits)


def _pred(model, x):
    with torch.no_grad():
        return model(x).argmax(dim=1)


def _fast(**kw):
    kw.setdefault("infidelity_samples", 0)
    kw.setdefault("sensitivity_samples", 0)
    return Attribution(**kw)


CASES = [
    ("integrated_gradients", {"n_steps": 16}, "zeros", lambda m: IntegratedGradients(m), True),
    ("saliency", {}, "zeros", lambda m: Saliency(m), False),
    ("input_x_gradient", {}, "zeros", lambda m: InputXGradient(m), False),
    ("deeplift", {}, "blur", lambda m: DeepLift(m), True),
    ("deeplift_shap", {}, "train", lambda m: DeepLiftShap(m), True),
    ("gradient_shap", {"n_samples": 4, "stdevs": 0.1}, "train", lambda m: GradientShap(m), True),
    ("occlusion", {"sliding_window_shapes": [1, 2, 2], "strides": [1, 2, 2]}, "zeros", lambda m: Occlusion(m), False),
    ("feature_ablation", {}, 0.5, lambda m: FeatureAblation(m), False),
    ("layer_gradcam", {}, "zeros", lambda m: LayerGradCam(m, m.features[2]), False),
]


@pytest.mark.parametrize("method,options,baseline,direct,has_delta", CASES, ids=[c[0] for c in CASES])
def test_attributions_equal_captum_called_directly(cnn, digits_small, method, options, baseline, direct, has_delta):
    cb = _fast(
        method=method,
        method_kwargs=options,
        baseline=baseline,
        num_samples=12,
        seed=3,
        layer="features.2" if method == "layer_gradcam" else None,
    )
    stub = StubTrainer(digits_small)
    result = cb.explain(cnn, stub)
    x = cb.sample.inputs
    targets = _pred(cnn, x)
    assert torch.equal(result.targets, targets)
    kwargs = dict(options)
    for key in ("sliding_window_shapes", "strides"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    if METHODS[method].baseline is not None:
        if baseline == "zeros":
            base = torch.zeros_like(x)
        elif baseline == "blur":
            base = gaussian_blur(x, 1.0)
        elif baseline == "train":
            base = cb.reference  # training inputs drawn once, seeded
            assert base.shape[0] == cb.num_baselines
        else:
            base = torch.full_like(x, baseline)
        kwargs["baselines"] = base
        assert torch.equal(result.baselines, base)
    torch.manual_seed(3)
    np.random.seed(3)
    if has_delta:
        expected, delta = direct(cnn).attribute(x, target=targets, return_convergence_delta=True, **kwargs)
        torch.testing.assert_close(result.delta, delta.reshape(-1))
    else:
        expected = direct(cnn).attribute(x, target=targets, **kwargs)
    torch.testing.assert_close(result.attributions, expected)
    assert result.importance.shape[0] == result.input_attributions[0].numel() == 64  # 8x8 pixels
    assert result.names[0] == "pixel(0,0)"


def test_tabular_methods_equal_captum_with_feature_names(adult):
    torch.manual_seed(0)
    model = TabularMLP().eval()
    dm = AdultSubset(adult)
    for method, direct, opts in [
        ("integrated_gradients", IntegratedGradients, {}),
        ("shapley_value_sampling", ShapleyValueSampling, {"n_samples": 2}),
    ]:
        cb = _fast(method=method, baseline="mean", num_samples=8, method_kwargs=opts, target="true")
        result = cb.explain(model, StubTrainer(dm))
        x, y = cb.sample.inputs, cb.sample.targets
        base = cb.reference.mean(dim=0, keepdim=True).expand_as(x)
        torch.manual_seed(0)
        out = direct(model).attribute(x, baselines=base, target=y, **opts)
        expected = out
        torch.testing.assert_close(result.attributions, expected)
        assert result.names == adult.feature_names
        top = cb.report()["top_features"]
        assert top[0]["score"] == pytest.approx(float(result.importance.max()))
        assert top[0]["feature"] in adult.feature_names


def test_integrated_gradients_completeness_within_reported_delta(cnn, digits_small):
    cb = _fast(method="integrated_gradients", num_samples=10, method_kwargs={"n_steps": 64})
    result = cb.explain(cnn, StubTrainer(digits_small))
    x, t = cb.sample.inputs, result.targets
    with torch.no_grad():
        fx = cnn(x).gather(1, t[:, None]).squeeze(1)
        fb = cnn(torch.zeros_like(x)).gather(1, t[:, None]).squeeze(1)
    sums = result.attributions.flatten(1).sum(dim=1)
    gap = (sums - (fx - fb)).abs()
    assert torch.all(gap <= result.delta.abs() + 1e-5)
    torch.testing.assert_close(gap, result.delta.abs(), atol=1e-5, rtol=1e-4)
    assert cb.report()["convergence_delta"] == pytest.approx(float(result.delta.abs().mean()))
    assert (fx - fb).abs().mean() > 10 * result.delta.abs().mean()  # the delta is small next to the output gap


def test_quality_metrics_equal_captum(cnn, digits_small):
    cb = Attribution(
        method="saliency", num_samples=8, infidelity_samples=6, sensitivity_samples=3, sensitivity_at="every", seed=5
    )
    result = cb.explain(cnn, StubTrainer(digits_small))
    assert result.infidelity is not None and result.infidelity >= 0
    assert result.sensitivity_max is not None and result.sensitivity_max >= 0
    x, t = cb.sample.inputs, result.targets
    torch.manual_seed(5)
    np.random.seed(5)
    Saliency(cnn).attribute(x, target=t)  # consumes no random numbers; kept for the same call order

    def perturb(inp):
        noise = torch.randn_like(inp) * 0.1
        return noise, inp - noise

    expected = infidelity(cnn, perturb, x, result.attributions, target=t, n_perturb_samples=6, normalize=True)
    assert result.infidelity == pytest.approx(float(expected.mean()), rel=1e-5)


def test_feature_importance_ranks_the_features_that_matter_first():
    dm = Synthetic()
    torch.manual_seed(0)
    model = TabularMLP(input_dim=8, hidden_dims=[16], lr=0.02)
    cb = Attribution(num_samples=64, infidelity_samples=0, sensitivity_samples=0, figures="never", max_overhead=None)
    trainer(max_epochs=3, callbacks=[cb]).fit(model, dm)
    top = cb.report()["top_features"]
    assert {top[0]["feature"], top[1]["feature"]} == {"f0", "f3"}
    assert top[1]["score"] > 3 * top[2]["score"]
    # one pass per epoch (nothing deferred to the end with these settings); drift from the second on
    assert [h["epoch"] for h in cb.history] == [0, 1, 2]
    drifts = cb.report()["drift_history"]
    assert drifts[0] is None and all(-1 <= d <= 1 for d in drifts[1:])


def test_token_attributions_and_html(tmp_path):
    dm = Tokens()
    torch.manual_seed(0)
    model = BagOfEmbeddings()
    trainer(max_epochs=2).fit(model, dm)
    model.eval()
    cb = _fast(
        method="layer_integrated_gradients",
        layer="embedding",
        num_samples=6,
        method_kwargs={"n_steps": 20},
        figures="every",
    )
    stub = StubTrainer(dm, log_dir=str(tmp_path))
    result = cb.explain(model, stub)
    cb._draw(stub, result)
    x = cb.sample.inputs
    expected, _delta = LayerIntegratedGradients(model, model.embedding).attribute(
        x, baselines=torch.zeros_like(x), target=_pred(model, x), n_steps=20, return_convergence_delta=True
    )
    torch.testing.assert_close(result.attributions, expected)
    torch.testing.assert_close(result.input_attributions, expected.sum(dim=-1))
    assert result.names == [f"token[{i}]" for i in range(6)]
    page = (tmp_path / "lightning_trust" / "explain" / "tokens.html").read_text()
    assert "<mark" in page and "good" in page and "film" in page


def test_sample_is_seeded_and_stratified(digits_small):
    a = _fast(num_samples=20, seed=1)
    a.explain(SmallCNN(channels=[4, 4]).eval(), StubTrainer(digits_small))
    b = _fast(num_samples=20, seed=1)
    b.explain(SmallCNN(channels=[4, 4]).eval(), StubTrainer(digits_small))
    assert a.sample.indices == b.sample.indices and torch.equal(a.sample.inputs, b.sample.inputs)
    counts = torch.bincount(a.sample.targets, minlength=10)
    assert counts.min() == 2 and counts.max() == 2  # 20 samples over 10 classes
    labels = torch.tensor([0] * 90 + [1] * 10)
    picked = stratified_indices(labels, 10, np.random.default_rng(0))
    assert (labels[picked] == 1).sum() == 5


def test_rank_correlation_is_spearman():
    from scipy.stats import spearmanr

    g = torch.Generator().manual_seed(0)
    for a, b in [
        (torch.tensor([0.1, 0.5, 0.2, 0.9]), torch.tensor([1.0, 3.0, 4.0, 5.0])),
        (torch.rand(50, generator=g), torch.rand(50, generator=g)),
        (torch.tensor([1.0, 1.0, 2.0, 3.0]), torch.tensor([0.5, 0.2, 0.2, 0.9])),
    ]:  # ties
        assert rank_correlation(a, b) == pytest.approx(spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-12)
    assert np.isnan(rank_correlation(torch.ones(4), torch.rand(4)))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"method": "lime"}, "Unknown `method"),
        ({"method": "layer_gradcam"}, "set `layer`"),
        ({"layer": "features.0"}, "only used by the layer_"),
        ({"method_kwargs": {"n_stepz": 3}}, "Unknown option"),
        ({"method": "occlusion"}, "sliding_window_shapes"),
        ({"target": "best"}, "`target`"),
        ({"baseline": "noise"}, "not one of"),
        ({"method": "saliency", "baseline": "mean"}, "takes no baseline"),
        ({"run_on": "epoch_end"}, "`run_on`"),
        ({"num_samples": 0}, "`num_samples`"),
        ({"figures": "sometimes"}, "`figures`"),
    ],
)
def test_bad_configuration_fails_early(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Attribution(**kwargs)


def test_feature_names_mismatch_and_missing_baseline_file(cnn, digits_small, tmp_path):
    cb = _fast(num_samples=4, feature_names=["a", "b"])
    with pytest.raises(ValueError, match="`feature_names` has 2 names"):
        cb.explain(cnn, StubTrainer(digits_small))
    cb = _fast(num_samples=4, baseline=str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cb.explain(cnn, StubTrainer(digits_small))
    torch.save(torch.full((1, 8, 8), 0.25), tmp_path / "base.pt")
    cb = _fast(num_samples=4, baseline=str(tmp_path / "base.pt"))
    result = cb.explain(cnn, StubTrainer(digits_small))
    assert torch.equal(result.baselines, torch.full((4, 1, 8, 8), 0.25))


def test_every_n_epochs_and_standalone_validate():
    dm = Synthetic(n=512)
    torch.manual_seed(0)
    model = TabularMLP(input_dim=8, hidden_dims=[8])
    cb = _fast(num_samples=8, every_n_epochs=2, figures="never", max_overhead=None)
    t = trainer(max_epochs=4, callbacks=[cb])
    t.fit(model, dm)
    assert [h["epoch"] for h in cb.history] == [1, 3]
    t.validate(model, dm, verbose=False)  # a standalone validation always explains
    assert len(cb.history) == 3 and cb.history[-1]["drift"] == pytest.approx(1.0)  # same weights, same ranking
    robust = AdversarialRobustness(epsilons=[0.0, 0.5], num_samples=16, run_on="test_end")
    attribution = _fast(num_samples=8, run_on="test_end", figures="never")
    trainer(callbacks=[robust, attribution]).test(model, dm.val_dataloader(), verbose=False)  # under inference_mode
    assert robust.report()["robust_accuracy"]["fgsm"]["0"] == robust.report()["clean_accuracy"]
    assert attribution.history[-1]["stage"] == "test_end"


@pytest.mark.parametrize("bar", ["rich", "tqdm"])
def test_progress_in_the_trainers_bar_style(bar, monkeypatch):
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    from lightning_trust.explain import progress

    seen = []
    original = progress.Progress.advance

    def advance(self, n=1):
        seen.append(self._rich is not None or self._tqdm is not None)
        original(self, n)

    monkeypatch.setattr(progress.Progress, "advance", advance)
    cb = _fast(num_samples=8, batch_size=4, figures="never")  # two Captum calls: progress shown
    progress_bar = RichProgressBar() if bar == "rich" else TQDMProgressBar()
    trainer(max_epochs=1, enable_progress_bar=True, callbacks=[progress_bar, cb]).fit(
        TabularMLP(input_dim=8, hidden_dims=[8]), Synthetic(n=256)
    )
    assert seen == [True, True] and len(cb.history) == 1
