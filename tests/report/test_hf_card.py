"""``lightning-trust report --format hf``: a Hugging Face README.md that huggingface_hub reads back
(``ModelCard.load``), with the card's numbers as ``model-index`` results; the Hub is never called."""

import json
import math
import shutil
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import ModelCard, ModelCardData

from lightning_trust.cli import main as cli_main
from lightning_trust.report import TrustReport, load_card
from lightning_trust.report.hf_card import check_hub_metadata, hf_model_card, task_type_of

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the Hugging Face card must not call the Hub")

    monkeypatch.setattr(huggingface_hub.repocard, "get_session", refuse)
    monkeypatch.setattr(huggingface_hub.repocard, "hf_hub_download", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def run_dir(tmp_path):
    shutil.copy(FIXTURES / "model_card_1_1.json", tmp_path / "model_card.json")
    return tmp_path


def _expected(card):
    """(config, metric type, value, name) of every result, computed from the card by hand."""
    out = [(None, {"acc": "accuracy", "loss": "loss"}[k.split("/")[1]], v, k)
           for k, v in card["metrics"].items() if k.startswith("val/")]  # fmt: skip
    fairness, evaluation = card["sections"]["fairness"], card["sections"]["evaluation"]
    out += [(None, k, v, f"fairness.{k}") for k, v in fairness.items()
            if k.endswith(("_difference", "_ratio")) and v is not None]  # fmt: skip
    for feature, groups in fairness["by_group"].items():
        for group, rec in groups.items():
            for m in ("accuracy", "selection_rate", "true_positive_rate", "false_positive_rate"):
                out.append((f"{feature}={group}", m, rec[m], f"fairness.by_group.{feature}.{group}.{m}"))
    for domain, rec in evaluation["per_domain"].items():
        for m, v in rec.items():
            if v is not None:
                out.append((f"native_region={domain}", m, v, f"evaluation.per_domain.{domain}.{m}"))
    return out


def test_hf_card_parses_back_with_the_cards_numbers_as_eval_results(run_dir, capsys):
    rc = cli_main(["report", str(run_dir), "--format", "hf", "--license", "apache-2.0",
                   "--dataset", "scikit-learn/adult-census-income"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert f"Hugging Face model card: {run_dir / 'README.md'}" in capsys.readouterr().out
    hub = ModelCard.load(run_dir / "README.md")
    card = load_card(run_dir)
    data = hub.data
    assert data.license == "apache-2.0" and data.datasets == ["scikit-learn/adult-census-income"]
    assert data.pipeline_tag == "tabular-classification" and data.model_name == "tabularmlp-on-adultdatamodule"
    assert {"lightning-trust", "differential-privacy", "fairness", "domain-shift", "pruning"} <= set(data.tags)
    got = [(r.dataset_config, r.metric_type, r.metric_value, r.metric_name) for r in data.eval_results]
    assert sorted(got, key=str) == sorted(_expected(card), key=str)
    assert not any(r[0] == "native_region=Other" for r in got)  # an empty domain has no value: left out
    by_name = {r.metric_name: r for r in data.eval_results}
    asia = by_name["evaluation.per_domain.Asia.accuracy"]
    assert asia.metric_value == card["sections"]["evaluation"]["per_domain"]["Asia"]["accuracy"]
    assert (asia.dataset_type, asia.dataset_name, asia.dataset_split) == (
        "scikit-learn/adult-census-income", "Adult (native_region=Asia)", "validation",
    )  # fmt: skip
    assert by_name["val/acc"].metric_value == card["metrics"]["val/acc"] and by_name["val/acc"].dataset_config is None
    # the Hub keeps one result per subset: its key (task, dataset, config, split) differs per domain and group
    meta = data.to_dict()
    results = meta["model-index"][0]["results"]
    assert len(results) == 1 + 7 + 4  # whole validation set, 7 groups, 4 measured domains
    check_hub_metadata(meta)
    again = ModelCardData(**meta)
    assert again.eval_results == data.eval_results and again.to_dict() == meta
    body = hub.text
    assert "| `privacy.epsilon` | <= 3 | 2.99818 | ✅ met |" in body
    assert "## Regulatory mapping" in body and "no evidence in this run" in body
    figure = card["figures"][0]["file"]
    assert f"]({figure})" in body and (run_dir / figure).is_file()


def test_the_license_is_required_and_checked(run_dir, capsys):
    assert cli_main(["report", str(run_dir), "--format", "hf"]) == 2
    assert "needs the model's license: pass --license" in capsys.readouterr().err
    assert cli_main(["report", str(run_dir), "--format", "hf", "--license", "apache2"]) == 2
    assert "not a Hugging Face Hub license id (close: apache-2.0)" in capsys.readouterr().err
    assert cli_main(["report", str(run_dir), "--format", "hf", "--license", "other"]) == 2
    assert "--license-name" in capsys.readouterr().err
    assert not (run_dir / "README.md").exists()
    rc = cli_main(["report", str(run_dir), "--format", "hf", "--license", "other", "--license-name", "acme-1",
                   "--license-link", "LICENSE"])  # fmt: skip
    assert rc == 0
    data = ModelCard.load(run_dir / "README.md").data
    assert (data.license, data.license_name, data.license_link) == ("other", "acme-1", "LICENSE")
    with pytest.raises(ValueError, match="'apache2' is not a Hugging Face Hub license id"):
        TrustReport(license="apache2")
    # the card's own license (TrustReport(license=...)) is used when none is passed
    card = {**load_card(run_dir), "license": "mit"}
    assert hf_model_card(card).data.license == "mit"


def test_task_type_is_inferred_from_the_card_or_refused():
    adult = load_card(FIXTURES / "model_card_1_1.json")
    text = load_card(FIXTURES / "model_card_1_0.json")  # the text transformer of the foundation job
    assert task_type_of(adult) == "tabular-classification" and task_type_of(text) == "text-classification"
    image = {**adult, "model": {**adult["model"], "input_shape": [1, 1, 8, 8], "hyperparameters": {}}}
    assert task_type_of(image) == "image-classification"
    no_classes = {**adult, "data": {**adult["data"], "splits": {"train": {"size": 10}}}}
    with pytest.raises(ValueError, match="pass --task-type"):
        task_type_of(no_classes)
    assert hf_model_card(no_classes, license="mit", task_type="text-generation").data.pipeline_tag == "text-generation"
    with pytest.raises(ValueError, match="task type 'tabular' is not one of"):
        hf_model_card(adult, license="mit", task_type="tabular")


def test_metadata_check_refuses_what_the_hub_would():
    meta = hf_model_card(load_card(FIXTURES / "model_card_1_1.json"), license="mit").data.to_dict()
    check_hub_metadata(meta)
    bad = json.loads(json.dumps(meta))
    bad["model-index"][0]["results"][0]["metrics"][0]["value"] = math.nan
    with pytest.raises(ValueError, match="is not finite"):
        check_hub_metadata(bad)
    bad = json.loads(json.dumps(meta))
    del bad["model-index"][0]["results"][1]["dataset"]["type"]
    with pytest.raises(ValueError, match=r"results\[1\]: dataset.type and dataset.name are required"):
        check_hub_metadata(bad)
    with pytest.raises(ValueError, match="`tags` must be a list"):
        check_hub_metadata({**meta, "tags": "fairness"})


@pytest.mark.slow
def test_a_run_card_carries_license_and_datasets_to_the_hub_card(adult, tmp_path, capsys):
    from lightning_trust.demo import TabularMLP
    from tests.report.helpers import LIMITS
    from tests.support import trainer

    report = TrustReport(license="mit", datasets=["scikit-learn/adult-census-income"], verbose=False)
    trainer(tmp_path, [report], **LIMITS).fit(TabularMLP(), adult)
    card = json.loads(report.paths["json"].read_text())
    assert card["license"] == "mit" and card["data"]["datasets"] == ["scikit-learn/adult-census-income"]
    assert cli_main(["report", str(report.paths["json"]), "--format", "hf"]) == 0, capsys.readouterr().err
    data = ModelCard.load(tmp_path / "README.md").data
    assert data.license == "mit" and data.datasets == card["data"]["datasets"]
    val = {r.metric_name: r.metric_value for r in data.eval_results}
    assert val == {k: v for k, v in card["metrics"].items() if k.startswith("val/")}
