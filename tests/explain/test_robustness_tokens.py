"""AdversarialRobustness on token models (embedding space) equal to Captum's FGSM/PGD called directly,
its budget on a demo fit, and its refusals at setup."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from captum.robust import FGSM, PGD
from torch.utils.data import DataLoader, TensorDataset

from lightning_trust.demo import SmallCNN
from lightning_trust.explain import AdversarialRobustness
from tests.foundation.models import build
from tests.support import trainer


def _fit(module, dm, cb, tmp_path, **kwargs):
    trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=3, limit_val_batches=2, **kwargs).fit(module, dm)


def test_bert_with_padding_equals_captum_fgsm_and_pgd_on_the_input_embeddings(tmp_path):
    torch.manual_seed(0)
    module, dm = build("bert")
    cb = AdversarialRobustness(epsilons=[0.0, 0.02, 0.1], num_samples=24, pgd_steps=3, progress=False,
                               max_overhead=None)  # fmt: skip
    _fit(module, dm, cb, tmp_path)
    report = cb.report()
    assert report["space"] == "embeddings" and report["num_samples"] == 24
    hf = module.eval().model
    ids, attention = cb.sample.inputs["input_ids"], cb.sample.inputs["attention_mask"]
    assert (attention == 0).any()  # padded sentences
    y = cb.sample.targets
    embeds = hf.get_input_embeddings()(ids).detach()
    mask = attention[..., None].expand_as(embeds).float()  # padding is never perturbed

    def forward(e, m):
        return hf(inputs_embeds=e, attention_mask=m).logits

    def loss(out, target):
        return F.cross_entropy(out, target, reduction="none")

    def accuracy(e):
        with torch.no_grad():
            return (forward(e, attention).argmax(-1) == y).float()

    clean = accuracy(embeds)
    assert report["clean_accuracy"] == pytest.approx(clean.mean().item())
    for eps in (0.02, 0.1):
        fgsm = FGSM(forward, loss_func=loss).perturb(embeds.clone(), eps, y, additional_forward_args=(attention,),
                                                     mask=mask)  # fmt: skip
        pgd = PGD(forward, loss_func=loss).perturb(embeds.clone(), eps, 2.5 * eps / 3, 3, y,
                                                   additional_forward_args=(attention,), mask=mask)  # fmt: skip
        assert torch.equal(fgsm[attention == 0], embeds[attention == 0])
        for name, adv in (("fgsm", fgsm), ("pgd", pgd)):
            right = accuracy(adv)
            assert report["robust_accuracy"][name][f"{eps:g}"] == pytest.approx(right.mean().item()), (name, eps)
            flipped = ((clean == 1) & (right == 0)).sum() / clean.sum()
            assert report["attack_success_rate"][name][f"{eps:g}"] == pytest.approx(flipped.item())
    assert report["robust_accuracy"]["pgd"]["0"] == report["clean_accuracy"]


def test_vit_pixel_values_are_attacked_in_input_space(tmp_path):
    torch.manual_seed(0)
    module, dm = build("vit")
    cb = AdversarialRobustness(attacks=["pgd"], epsilons=[0.1], num_samples=16, pgd_steps=2, progress=False,
                               input_range=[0.0, 1.0], max_overhead=None)  # fmt: skip
    _fit(module, dm, cb, tmp_path)
    hf = module.eval().model
    x, y = cb.sample.inputs["pixel_values"], cb.sample.targets
    adv = PGD(lambda p: hf(pixel_values=p).logits, loss_func=lambda o, t: F.cross_entropy(o, t, reduction="none"),
              lower_bound=0.0, upper_bound=1.0).perturb(x, 0.1, 2.5 * 0.1 / 2, 2, y)  # fmt: skip
    with torch.no_grad():
        expected = (hf(pixel_values=adv).logits.argmax(-1) == y).float().mean().item()
    assert cb.report()["space"] == "inputs"
    assert cb.report()["robust_accuracy"]["pgd"]["0.1"] == pytest.approx(expected)


@pytest.mark.slow
def test_measured_overhead_stays_under_max_overhead_except_the_final_run(digits, tmp_path):
    torch.manual_seed(0)
    cb = AdversarialRobustness(attacks=["fgsm"], epsilons=[0.0, 0.1], num_samples=64, progress=False,
                               input_range=[0.0, 1.0])  # fmt: skip  # default max_overhead=0.05
    trainer(tmp_path, [cb], max_epochs=8).fit(SmallCNN(channels=[8, 16]), digits)
    account = cb.report()["overhead"]
    assert account["max_overhead"] == 0.05 and account["runs"] + account["skipped"] == 8
    assert account["runs"] == len(cb.history) >= 2  # the first and the final pass at least
    assert cb.history[-1]["epoch"] == 7
    fit_seconds = account["seconds"] / account["overhead"]
    # the budget admits a pass when its expected cost (the mean so far) fits; the first pass (nothing measured
    # yet) or one slower than the mean may overshoot by at most that one pass (timings vary with the load)
    before_final = account["pass_seconds"][:-1]
    assert sum(before_final) <= 0.05 * fit_seconds + max(before_final), (account, fit_seconds)


def _refused(module, dm, cb, tmp_path, match):
    with pytest.raises(ValueError, match=match):
        _fit(module, dm, cb, tmp_path)
    assert module.global_step == 0


def test_refusals_at_setup_name_the_fix(tmp_path, digits):
    robust = {"num_samples": 8, "progress": False}
    module, dm = build("boring")
    _refused(module, dm, AdversarialRobustness(**robust), tmp_path, r"batch_keys: \{target: ")
    module, dm = build("demo_transformer")
    _refused(module, dm, AdversarialRobustness(**robust), tmp_path, r"or set `run_on: fit_end`")
    module, dm = build("bert")
    _refused(module, dm, AdversarialRobustness(input_range=[0, 1], **robust), tmp_path, r"remove `input_range`")
    module, dm = build("gpt2_lm")
    _refused(module, dm, AdversarialRobustness(min_perturbation=True, **robust), tmp_path,
             r"set `min_perturbation=False`")  # fmt: skip
    _refused(SmallCNN(channels=[4, 8]), digits, AdversarialRobustness(epsilons=[8.0], input_range=[0, 1], **robust),
             tmp_path, r"8/255 = 0.031")  # fmt: skip


def test_targets_outside_the_models_classes_are_refused_at_setup(tmp_path):
    import lightning.pytorch as pl

    class Data(pl.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))), batch_size=8)

        def val_dataloader(self):
            return DataLoader(TensorDataset(torch.rand(16, 1, 8, 8), torch.full((16,), 12)), batch_size=8)

    _refused(SmallCNN(channels=[4, 8]), Data(), AdversarialRobustness(num_samples=8, progress=False), tmp_path,
             r"Targets \[12\] are not indices of the model's 10 output classes")  # fmt: skip
