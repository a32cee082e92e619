import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd, timeout=600):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _console_script():
    return str(Path(sys.executable).with_name("lightning-trust"))


@pytest.mark.slow
def test_console_script_fast_dev_run(tmp_path):
    _run(
        [
            _console_script(),
            "fit",
            "--config",
            str(ROOT / "configs/adult.yaml"),
            "--trainer.fast_dev_run=true",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        cwd=tmp_path,
    )


@pytest.mark.slow
def test_module_entry_point_print_config(tmp_path):
    proc = _run(
        [
            sys.executable,
            "-m",
            "lightning_trust",
            "fit",
            "--config",
            str(ROOT / "configs/digits.yaml"),
            "--print_config",
        ],
        cwd=tmp_path,
    )
    assert "class_path: lightning_trust.demo.SmallCNN" in proc.stdout


def _test_accuracy(output: str) -> float:
    for line in output.splitlines():
        if "test/acc" in line:
            return float(line.replace("│", " ").split()[-1])
    raise AssertionError(f"no test/acc in output:\n{output[-3000:]}")


@pytest.mark.slow
@pytest.mark.parametrize(("config", "minimum"), [("adult_plain.yaml", 0.84), ("digits_plain.yaml", 0.95)])
def test_demo_configs_reach_documented_accuracy(config, minimum, tmp_path):
    common = [
        "--config",
        str(ROOT / "configs" / config),
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]
    _run([_console_script(), "fit", *common], cwd=tmp_path)
    checkpoints = sorted(tmp_path.glob("**/checkpoints/last.ckpt"))
    assert checkpoints, "fit wrote no last.ckpt"
    proc = _run([_console_script(), "test", *common, f"--ckpt_path={checkpoints[-1]}"], cwd=tmp_path)
    assert _test_accuracy(proc.stdout) >= minimum


#: Required constructor arguments of the callbacks that have some (the rest take none).
REQUIRED_ARGS = {"HoldOutDomain": {"domain_key": "native_region", "held_out": ["Europe"]}}


@pytest.mark.slow
def test_every_callback_resolves_by_short_name_and_no_args_warning_is_printed(tmp_path):
    import yaml
    from lightning.pytorch.strategies import Strategy

    from lightning_trust.registry import callback_classes

    classes = callback_classes()
    callbacks = [
        {"class_path": name, "init_args": REQUIRED_ARGS.get(name, {})}
        for name, cls in classes.items()
        if not issubclass(cls, Strategy)
    ]
    strategies = [name for name, cls in classes.items() if issubclass(cls, Strategy)]
    config = yaml.safe_load((ROOT / "configs" / "adult_plain.yaml").read_text())
    config["trainer"]["callbacks"] = callbacks
    config["trainer"]["strategy"] = {"class_path": strategies[0]} if strategies else "auto"
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = _run([_console_script(), "fit", "--config", str(path), "--print_config"], cwd=tmp_path)
    printed = yaml.safe_load(proc.stdout)
    resolved = [cb["class_path"] for cb in printed["trainer"]["callbacks"]]
    # each short name resolved to the pack's own class (jsonargparse prints the full import path)
    assert [r.rsplit(".", 1)[-1] for r in resolved] == [cb["class_path"] for cb in callbacks], resolved
    assert all(r.startswith("lightning_trust.") for r in resolved), resolved
    # LightningCLI warns when given both `args=` and a command line; the console script gives only one
    assert "args and command line arguments" not in proc.stderr + proc.stdout
    assert "sys.argv[1:]" not in proc.stderr + proc.stdout


def test_main_called_from_python_beside_a_command_line_does_not_warn(monkeypatch, recwarn, capsys):
    import sys

    from lightning_trust.cli import main

    monkeypatch.setattr(sys, "argv", ["pytest", "-q", "-k", "something"])
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(ROOT / "configs" / "adult_plain.yaml"), "--print_config"])
    assert info.value.code in (0, None)
    assert "class_path: lightning_trust.demo" in capsys.readouterr().out
    assert not [w for w in recwarn if "args parameter" in str(w.message)]
    assert sys.argv == ["pytest", "-q", "-k", "something"]
