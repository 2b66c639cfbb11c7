"""Third-party models, encoders and datasets plug in through entry points (``needlework.<kind>s``)."""

import os
import subprocess
import sys
import textwrap


def make_plugin(root, body: str, entry_points: str) -> dict:
    (root / "nw_plugin.py").write_text(textwrap.dedent(body))
    info = root / "nw_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: nw-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}


def run(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=120)


def test_entry_points_register_models_and_datasets(tmp_path):
    env = make_plugin(tmp_path, """
        import torch
        from needlework.registry import register_encoder

        class Tiny(torch.nn.Module):
            def __init__(self, num_classes=2):
                super().__init__()
                self.num_classes = num_classes

        def tiny_dataset(split="train"):
            return [split] * 3

        @register_encoder("tiny_encoder")   # a module entry point registers by decorator
        def tiny_encoder():
            return torch.nn.Identity()
    """, """
        [needlework.models]
        tiny_plugin = nw_plugin:Tiny
        [needlework.datasets]
        tiny_ds = nw_plugin:tiny_dataset
        [needlework.encoders]
        family = nw_plugin
    """)
    proc = run("""
        import needlework
        m = needlework.create_model("tiny_plugin", num_classes=3)
        assert m.num_classes == 3 and "tiny_plugin" in needlework.list_models()
        assert "bagnet" in needlework.list_models()          # built-ins are still there
        assert needlework.create_dataset("tiny_ds", split="val") == ["val"] * 3
        assert "tiny_encoder" in needlework.list_encoders()
        print("ok")
    """, env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_broken_plugin_is_named(tmp_path):
    env = make_plugin(tmp_path, "raise RuntimeError('boom')\n", "[needlework.models]\nbad = nw_plugin:Bad\n")
    proc = run("import needlework; needlework.create_model('no_such_model')", env)
    assert proc.returncode != 0
    assert "needlework.models entry point 'bad' (nw_plugin:Bad) failed to import: boom" in proc.stderr
    assert "Fix or uninstall" in proc.stderr


def test_unknown_name_mentions_entry_points():
    import pytest

    import needlework

    with pytest.raises(KeyError, match=r"needlework\.models' entry points"):
        needlework.create_model("definitely_not_a_model")
