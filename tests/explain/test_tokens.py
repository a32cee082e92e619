"""Token, multi-input, causal-LM and vision-transformer attributions against Captum called directly,
the checks made before training, and the token/patch heatmaps."""

import pytest
import torch
from captum.attr import (
    FeatureAblation,
    IntegratedGradients,
    LayerIntegratedGradients,
    LLMAttribution,
    LLMGradientAttribution,
    TextTokenInput,
)
from lightning.pytorch.callbacks import Callback

from lightning_trust.explain import Attribution
from lightning_trust.explain.llm import IdTokenizer
from tests.explain.helpers import StubTrainer
from tests.foundation.models import DataModule, TokenDataset, build
from tests.support import trainer


def _fast(**kw):
    kw.setdefault("infidelity_samples", 0)
    kw.setdefault("sensitivity_samples", 0)
    kw.setdefault("progress", False)
    return Attribution(**kw)


@pytest.fixture
def bert():
    module, dm = build("bert")
    return module.eval(), dm


def _bert_forward(module):
    def forward(input_ids, attention_mask):
        return module(input_ids, attention_mask=attention_mask).logits

    return forward


def test_bert_with_padding_equals_captum_with_the_mask_passed(bert, tmp_path):
    module, dm = bert
    cb = _fast(num_samples=8, baseline=7, method_kwargs={"n_steps": 8}, seed=1)  # default method: IG
    result = cb.explain(module, StubTrainer(dm, log_dir=str(tmp_path)))
    ids, mask = cb.sample.inputs, cb.sample.others["attention_mask"]
    assert (mask == 0).any() and (mask == 1).all(dim=1).any()  # padded and unpadded samples
    forward = _bert_forward(module)
    targets = forward(ids, mask).argmax(-1)
    assert torch.equal(result.targets, targets)
    base = torch.where(mask.bool(), torch.full_like(ids, 7), ids)  # the baseline token, padding kept
    assert torch.equal(result.baselines, base)
    embeddings = module.model.bert.embeddings.word_embeddings
    expected, delta = LayerIntegratedGradients(forward, embeddings).attribute(
        ids, baselines=base, additional_forward_args=(mask,), target=targets, n_steps=8, return_convergence_delta=True
    )
    torch.testing.assert_close(result.attributions, expected)
    torch.testing.assert_close(result.delta, delta)
    scores = expected.sum(dim=-1) * mask  # per token, padding excluded
    torch.testing.assert_close(result.input_attributions, scores)
    assert (result.input_attributions[mask == 0] == 0).all()
    # the mask matters: without it Captum gives other numbers
    unmasked = LayerIntegratedGradients(lambda x: module(x).logits, embeddings).attribute(
        ids, baselines=base, target=targets, n_steps=8
    )
    gap = float((unmasked - expected).abs().max() / expected.abs().max())
    assert gap > 1e-4, gap  # far above float error (~1e-7): the mask changes the numbers
    report = cb.report()
    assert report["layer"] == "model.bert.embeddings.word_embeddings" and report["input"] == "input_ids"
    assert [len(row) for row in report["tokens"]] == mask.sum(dim=1).tolist()  # unpadded tokens only
    first = report["tokens"][0]
    assert [t["score"] for t in first] == pytest.approx(scores[0][mask[0].bool()].tolist())


def test_zero_embedding_baseline_equals_ig_over_the_input_embeddings(bert):
    module, dm = bert
    cb = _fast(
        method="layer_integrated_gradients", baseline="zero_embedding", num_samples=4, method_kwargs={"n_steps": 6}
    )
    result = cb.explain(module, StubTrainer(dm))
    ids, mask = cb.sample.inputs, cb.sample.others["attention_mask"]
    embedded = module.model.bert.embeddings.word_embeddings(ids).detach()

    def forward(inputs_embeds, attention_mask):
        return module.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask).logits

    targets = forward(embedded, mask).argmax(-1)
    expected = IntegratedGradients(forward).attribute(
        embedded, baselines=torch.zeros_like(embedded), additional_forward_args=(mask,), target=targets, n_steps=6
    )
    torch.testing.assert_close(result.attributions, expected, atol=1e-5, rtol=1e-4)


def test_pad_and_mask_baselines_read_the_datamodule_and_the_config(bert):
    module, dm = bert
    cb = _fast(method="layer_integrated_gradients", baseline="pad", num_samples=4, method_kwargs={"n_steps": 4})
    result = cb.explain(module, StubTrainer(dm))
    mask = cb.sample.others["attention_mask"].bool()
    assert (result.baselines[mask] == module.model.config.pad_token_id).all()

    class WithMask(DataModule):
        mask_token_id = 5

    cb = _fast(method="layer_integrated_gradients", baseline="mask", num_samples=4, method_kwargs={"n_steps": 4})
    result = cb.explain(module, StubTrainer(WithMask(TokenDataset)))
    mask = cb.sample.others["attention_mask"].bool()
    assert (result.baselines[mask] == 5).all() and torch.equal(result.baselines[~mask], cb.sample.inputs[~mask])
    with pytest.raises(ValueError, match="mask token's id"):
        _fast(baseline="mask", num_samples=2).explain(module, StubTrainer(dm))


def test_causal_lm_equals_captum_llm_attribution():
    module, dm = build("gpt2_lm")
    module.eval()
    cb = _fast(method="layer_integrated_gradients", num_samples=3, method_kwargs={"n_steps": 6}, max_new_tokens=3)
    result = cb.explain(module, StubTrainer(dm))
    hf, tok = module.model, IdTokenizer()
    ids, mask = cb.sample.inputs, cb.sample.others["attention_mask"]
    for i in range(3):
        prompt = ids[i][mask[i].bool()]
        direct = LLMGradientAttribution(LayerIntegratedGradients(hf, hf.get_input_embeddings()), tok).attribute(
            TextTokenInput(tok.decode(prompt), tok, baselines=0),
            gen_args={"max_new_tokens": 3, "do_sample": False},
            n_steps=6,
        )
        torch.testing.assert_close(result.token_attr[i], direct.token_attr)
        torch.testing.assert_close(result.input_attributions[i][mask[i].bool()], direct.seq_attr)
        assert result.generated[i] == direct.output_tokens
    assert cb.report()["generated"] == result.generated and cb.report()["layer"] == "model.transformer.wte"
    ablation = _fast(method="feature_ablation", num_samples=1, max_new_tokens=2)
    found = ablation.explain(module, StubTrainer(dm))
    prompt = ablation.sample.inputs[0][ablation.sample.others["attention_mask"][0].bool()]
    direct = LLMAttribution(FeatureAblation(hf), tok).attribute(
        TextTokenInput(tok.decode(prompt), tok, baselines=0),
        gen_args={"max_new_tokens": 2, "do_sample": False},
        use_cached_outputs=False,
    )
    torch.testing.assert_close(found.token_attr[0], direct.token_attr)


def test_vit_patches_equal_ig_on_pixel_values_summed_per_patch(tmp_path):
    module, dm = build("vit")
    module.eval()
    cb = _fast(num_samples=4, method_kwargs={"n_steps": 8}, figures="every")
    stub = StubTrainer(dm, log_dir=str(tmp_path))
    result = cb.explain(module, stub)
    x = cb.sample.inputs

    def forward(pixel_values):
        return module(pixel_values).logits

    targets = forward(x).argmax(-1)
    expected = IntegratedGradients(forward).attribute(x, baselines=torch.zeros_like(x), target=targets, n_steps=8)
    torch.testing.assert_close(result.attributions, expected)
    by_hand = expected.sum(dim=1).reshape(4, 2, 4, 2, 4).sum(dim=(2, 4))  # 8x8 images, 4x4 patches
    torch.testing.assert_close(result.patches, by_hand)
    cb._draw(stub, result)
    assert cb.report()["patch_size"] == 4
    assert (tmp_path / "lightning_trust" / "explain" / "patch_heatmap.png").is_file()
    assert set(cb.report()["figures"]) >= {"patch_heatmap", "heatmaps", "feature_importance"}


@pytest.mark.slow
def test_text_demo_token_heatmap_with_token_strings(tmp_path):
    from lightning_trust.demo import AdultTextDataModule, TinyTextTransformer

    dm = AdultTextDataModule(batch_size=128)
    torch.manual_seed(0)
    model = TinyTextTransformer(pretrain_if_missing=False)
    cb = _fast(num_samples=4, method_kwargs={"n_steps": 8}, baseline="pad", max_overhead=None)
    trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=4, limit_val_batches=2).fit(model, dm)
    report = cb.report()
    assert (tmp_path / "lightning_trust" / "explain" / "token_heatmap.png").is_file() or report["figures"]
    assert "token_heatmap" in report["figures"] and report["figures"]["token_heatmap"].endswith("token_heatmap.png")
    words = [t["token"] for t in report["tokens"][0]]
    mask = cb.sample.others["attention_mask"][0].bool()
    assert words == [dm.id_to_token[i] for i in cb.sample.inputs[0][mask].tolist()]
    assert words[0] == "[CLS]" and "age" in words


# checks before training ---------------------------------------------------------------------------------
class Steps(Callback):
    def __init__(self):
        self.steps = 0

    def on_before_optimizer_step(self, *args):
        self.steps += 1


@pytest.mark.parametrize(
    ("model", "kwargs", "match"),
    [
        ("bert", {"target": 5}, r"`target=5` is not a class of the model: its output has 2 classes"),
        ("bert", {"method": "layer_integrated_gradients", "layer": "model.bert.embedings.word_embeddings"},
         r"did you mean \['model\.bert\.embeddings\.word_embeddings'"),
        ("bert", {"baseline": "mean"}, r"baseline='mean' needs float inputs.*use 'pad'"),
        ("bert", {"baseline": 999}, r"baseline=999 is not a token id of the model \(0\.\.63\)"),
        ("bert", {"method": "saliency"}, r"holds integer token ids; use method='layer_integrated_gradients'"),
        ("vit", {"baseline": "pad"}, r"baseline='pad' is for token inputs"),
        ("demo_transformer", {}, r"has no `validation_step`.*add a `validation_step`.*or set `run_on: fit_end`"),
        ("gpt2_lm", {"target": "true"}, r"use target='pred'"),
    ],
)  # fmt: skip
def test_bad_setups_are_refused_before_training(tmp_path, model, kwargs, match):
    module, dm = build(model)
    steps = Steps()
    with pytest.raises(ValueError, match=match):
        trainer(tmp_path, [_fast(num_samples=2, **kwargs), steps], max_epochs=1, limit_train_batches=2).fit(module, dm)
    assert steps.steps == 0


def test_baseline_file_of_the_wrong_shape_is_refused_at_setup(tmp_path, bert):
    module, dm = bert
    torch.save(torch.zeros(3, dtype=torch.long), tmp_path / "base.pt")
    with pytest.raises(ValueError, match=r"has shape \(3,\); expected one input \(10,\)"):
        trainer(tmp_path, [_fast(baseline=str(tmp_path / "base.pt"))], max_epochs=1).fit(module, dm)
