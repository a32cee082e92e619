import json

import jsonschema
import pytest
import torch
import torch_pruning as tp

from lightning_trust.cli import main as cli_main
from lightning_trust.demo import TabularMLP
from lightning_trust.report import (
    TrustReport,
    UnknownStandardError,
    card_schema,
    diff_cards,
    load_card,
    render_html,
    render_markdown,
)
from tests.report.conftest import STANDARDS
from tests.report.helpers import LIMITS, FakeSection
from tests.support import trainer


def test_writes_three_files_and_json_validates_against_the_shipped_schema(run):
    paths = run["report"].paths
    assert paths["json"].parent == run["dir"]  # logger=False: the run's log dir is default_root_dir
    assert all(p.is_file() for p in paths.values())
    card = json.loads(paths["json"].read_text())
    jsonschema.Draft202012Validator.check_schema(card_schema())
    jsonschema.validate(card, card_schema(), cls=jsonschema.Draft202012Validator)
    jsonschema.validate(run["fit"], card_schema(), cls=jsonschema.Draft202012Validator)
    assert card["schema_version"] == "1.2"
    assert "privacy.epsilon" in {t["topic"]: t for t in card["evidence_map"]["topics"]}["privacy"]["numbers"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**card, "summary": {"met": 1}}, card_schema())


def test_each_standard_appears_with_its_verdict(run):
    by_name = {s["name"]: s for s in run["fit"]["standards"]}
    assert list(by_name) == list(STANDARDS)
    assert by_name["privacy.epsilon"] == {
        "name": "privacy.epsilon",
        "min": None,
        "max": 8.0,
        "value": 2.5,
        "status": "met",
    }
    assert by_name["robustness.robust_accuracy.fgsm.0.1"]["status"] == "not_met"
    assert by_name["robustness.robust_accuracy.fgsm.0.1"]["value"] == 0.7
    assert by_name["model.params"]["status"] == "met"
    assert by_name["metrics.test/acc"]["status"] == "not_measured"  # test has not run after fit
    assert run["fit"]["summary"] == {
        "standards": 4, "met": 2, "not_met": 1, "not_measured": 1, "unknown": 0, "all_met": False,
    }  # fmt: skip
    after_test = {s["name"]: s for s in run["report"].card["standards"]}
    assert after_test["metrics.test/acc"]["status"] == "met"
    assert after_test["metrics.test/acc"]["value"] == pytest.approx(float(run["trainer"].callback_metrics["test/acc"]))
    assert run["report"].exit_code == 1  # fail_on_breach and fgsm breached
    md = run["md_fit"].decode()
    assert "| `privacy.epsilon` | <= 8 | 2.5 | ✅ met |" in md
    assert "| `robustness.robust_accuracy.fgsm.0.1` | >= 0.9 | 0.7 | ❌ NOT MET |" in md


def test_sections_come_from_the_report_protocol_with_figures_embedded(run):
    card = run["fit"]
    assert list(card["sections"]) == ["privacy", "robustness", "explain"]
    assert card["sections"]["privacy"] == {"epsilon": 2.5, "delta": 1e-5, "sampling": "poisson"}
    assert [f["key"] for f in card["figures"]] == ["privacy.epsilon_curve", "robustness.robust_accuracy"]
    for figure in card["figures"]:
        import base64

        png = base64.b64decode(figure["data"])
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert (run["dir"] / figure["file"]).read_bytes() == png
    html = run["report"].paths["html"].read_text()
    assert html.count('src="data:image/png;base64,') == 2
    assert "http://" not in html and "https://" not in html and "<script" not in html and "<link" not in html


def test_run_facts_equal_direct_computation(run, adult):
    card, model = run["report"].card, run["model"]
    assert card["model"]["params"] == sum(p.numel() for p in model.parameters())
    macs, _ = tp.utils.count_ops_and_params(model.eval(), torch.zeros(1, adult.num_features))
    assert card["model"]["macs"] == int(macs) and card["model"]["input_shape"] == [1, adult.num_features]
    splits = card["data"]["splits"]
    assert {k: v["size"] for k, v in splits.items()} == {
        "train": len(adult.train_dataset),
        "val": len(adult.val_dataset),
        "test": len(adult.test_dataset),
    }
    y = adult.train_dataset.tensors["y"]
    assert splits["train"]["class_counts"] == {"0": int((y == 0).sum()), "1": int((y == 1).sum())}
    assert splits["train"]["class_balance"]["1"] == pytest.approx(float(y.float().mean()))
    groups = card["data"]["groups"]
    assert list(groups) == ["sex", "race", "native_region"]
    assert groups["native_region"]["role"] == "domain" and groups["sex"]["role"] == "sensitive"
    sex = adult.train_dataset.tensors["sex"]
    assert groups["sex"]["counts"] == {name: int((sex == i).sum()) for i, name in enumerate(adult.categories["sex"])}
    training = card["training"]
    assert training["epochs"] == 1 and training["global_steps"] == 3 and training["duration_s"] > 0
    assert training["packages"]["torch"] == torch.__version__ and "lightning" in training["packages"]
    assert training["config"]["model"]["hidden_dims"] == [64, 32]
    assert card["metrics"]["test/acc"] == pytest.approx(float(run["trainer"].callback_metrics["test/acc"]))


def test_regenerating_from_json_reproduces_markdown_byte_for_byte(run, tmp_path):
    source = run["report"].paths["json"]
    card = load_card(source)
    assert render_markdown(card).encode() == run["report"].paths["md"].read_bytes()
    assert render_html(card).encode() == run["report"].paths["html"].read_bytes()
    code = cli_main(["report", str(source), "--output-dir", str(tmp_path)])
    assert code == 0
    assert (tmp_path / "model_card.md").read_bytes() == run["report"].paths["md"].read_bytes()
    assert (tmp_path / "model_card.html").read_bytes() == run["report"].paths["html"].read_bytes()
    assert (tmp_path / "model_card_figures" / "privacy_epsilon_curve.png").is_file()
    assert cli_main(["report", str(run["dir"]), "--output-dir", str(tmp_path), "--fail-on-breach"]) == 1


def test_diff_of_two_runs(run, tmp_path, capsys):
    before = run["fit"]
    after = json.loads(json.dumps(before))
    after["sections"]["robustness"]["robust_accuracy"]["fgsm"]["0.1"] = 0.95
    for s in after["standards"]:
        if s["name"] == "robustness.robust_accuracy.fgsm.0.1":
            s.update(value=0.95, status="met")
    diff = diff_cards(before, after)
    changed = {c["name"]: c for c in diff["changed"]}
    assert list(changed) == ["robustness.robust_accuracy.fgsm.0.1", "robustness.worst_accuracy"][:1]
    assert changed["robustness.robust_accuracy.fgsm.0.1"]["delta"] == pytest.approx(0.25)
    verdict = next(s for s in diff["standards"] if s["name"] == "robustness.robust_accuracy.fgsm.0.1")
    assert (verdict["before"], verdict["after"]) == ("not_met", "met")
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(before))
    b.write_text(json.dumps(after))
    capsys.readouterr()
    assert cli_main(["report", str(a), str(b), "--diff-output", str(tmp_path / "diff.json")]) == 0
    out = capsys.readouterr().out
    assert "| `robustness.robust_accuracy.fgsm.0.1` | 0.7 (NOT MET) | 0.95 (met) | NOT MET -> met |" in out
    assert json.loads((tmp_path / "diff.json").read_text())["changed"][0]["after"] == 0.95


def test_report_cli_errors_clearly_on_missing_or_foreign_files(tmp_path, capsys):
    assert cli_main(["report", str(tmp_path / "nope.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "model_card.json").write_text(json.dumps({"schema_version": "7.0"}))
    assert cli_main(["report", str(tmp_path)]) == 2
    assert "schema 7.0" in capsys.readouterr().err


def test_unknown_section_fails_before_training_listing_sections(adult, tmp_path):
    report = TrustReport(standards={"privacy.epsilon": {"max": 8}})
    with pytest.raises(
        UnknownStandardError, match=r"name sections no callback.*'data', 'metrics', 'model', 'training'"
    ):
        trainer(tmp_path, [report], **LIMITS).fit(TabularMLP(), adult)


def test_unknown_name_is_an_error_listing_reported_names_after_writing_the_card(adult, tmp_path):
    fake = FakeSection("privacy", {"epsilon": 2.5}, figure=None)
    report = TrustReport(standards={"privacy.epsilom": {"max": 8}})
    with pytest.raises(UnknownStandardError) as err:
        trainer(tmp_path, [fake, report], **LIMITS).fit(TabularMLP(), adult)
    text = str(err.value)
    assert "privacy.epsilom (did you mean privacy.epsilon?)" in text
    assert "\n  model.params\n" in text and "\n  privacy.epsilon\n" in text
    assert (tmp_path / "model_card.json").is_file()  # nothing lost


def test_constructor_validates_arguments():
    with pytest.raises(ValueError, match="`max` must be a number"):
        TrustReport(standards={"privacy.epsilon": {"max": "low"}})
    with pytest.raises(TypeError, match="fail_on_breach"):
        TrustReport(fail_on_breach="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sensitive_features"):
        TrustReport(sensitive_features="sex")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_data_samples"):
        TrustReport(max_data_samples=0)


def test_training_time_accumulates_over_a_resumed_run(adult, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    first = TrustReport(verbose=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, [first, ckpt], **LIMITS, enable_checkpointing=True).fit(TabularMLP(), adult)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"]["TrustReport"]
    assert saved["duration_s"] > 0
    second = TrustReport(verbose=False)
    t = trainer(tmp_path / "resumed", [second, ModelCheckpoint(dirpath=tmp_path / "ckpt2")],
                **{**LIMITS, "max_epochs": 2},
                enable_checkpointing=True)  # fmt: skip
    t.fit(TabularMLP(), adult, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert second.card["training"]["duration_s"] > saved["duration_s"]
    assert second.card["training"]["epochs"] == 2 and second.card["training"]["global_steps"] == 6
