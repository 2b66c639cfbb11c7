"""Model arguments on the training command line (issue 15, item 9): nested overrides merge, every
argument of the model shows in ``--print_config``, an unknown one is a parse-time error."""

import inspect

import pytest
import yaml

from needlework.cli import main as cli_main
from needlework.cli.model_args import check_model_kwargs, merge_overrides, split_overrides
from needlework.cli.train import build_cli, resolve_config_args
from needlework.models.mil.transmil import TransMIL

TRANSMIL = ["fit", "--config", "mil/transmil"]  # mil_kwargs: {dim: 128, heads: 4, dropout: 0.1}


def _printed_model_kwargs(capsys, *flags):
    with pytest.raises(SystemExit) as exit_:
        cli_main([*TRANSMIL, *flags, "--print_config"])
    assert exit_.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["model_kwargs"]


def test_nested_override_keeps_its_siblings(capsys):
    kwargs = _printed_model_kwargs(capsys, "--model.init_args.model_kwargs.mil_kwargs.heads", "2")
    mil = kwargs["mil_kwargs"]
    assert (mil["dim"], mil["heads"], mil["dropout"]) == (128, 2, 0.1)
    assert kwargs["mil"] == "transmil"


def test_print_config_lists_every_model_argument_with_its_default(capsys):
    mil = _printed_model_kwargs(capsys)["mil_kwargs"]
    defaults = {n: p.default for n, p in inspect.signature(TransMIL).parameters.items()
                if n not in ("in_dim", "num_classes")}  # fmt: skip
    assert set(mil) == set(defaults)
    assert {k: v for k, v in mil.items() if k not in ("dim", "heads")} == {
        k: v for k, v in defaults.items() if k not in ("dim", "heads")
    }


def test_the_built_model_gets_the_merged_arguments():
    cli = build_cli(
        resolve_config_args(["--config", "mil/transmil", "--model.model_kwargs.mil_kwargs.heads=2"]),
        run=False,
    )
    assert cli.model.hparams.model_kwargs["mil_kwargs"] == {"dim": 128, "heads": 2, "dropout": 0.1}
    head = cli.model.model.aggregator
    assert isinstance(head, TransMIL) and head.embed[0].out_features == 128
    assert head.layer1.attention.heads == 2 and head.layer2.attention.heads == 2


@pytest.mark.parametrize(
    ("flag", "named"),
    [
        ("--model.init_args.model_kwargs.mil_kwargs.bogus", "model 'transmil' has no argument 'bogus'"),
        ("--model.init_args.model_kwargs.colour", "model 'lenet_mil' has no argument 'colour'"),
        ("--model.init_args.model_kwargs.num_classes", "num_classes is set by the task"),
    ],
)
def test_unknown_model_argument_is_a_parse_error(capsys, monkeypatch, flag, named):
    import needlework.training.task as task

    def never(*args, **kwargs):
        raise AssertionError("the model was built before the bad argument was reported")

    monkeypatch.setattr(task, "create_model", never)
    with pytest.raises(SystemExit) as exit_:
        cli_main([*TRANSMIL, flag, "3"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and named in err and "Traceback" not in err


def test_split_and_merge():
    rest, overrides = split_overrides(
        ["fit", "--model.init_args.model_kwargs.a.b", "[1, 2]", "--x", "1", "--model.model_kwargs.c=null"]
    )
    assert rest == ["fit", "--x", "1"] and overrides == [(["a", "b"], [1, 2]), (["c"], None)]
    base = {"a": {"b": 0, "keep": 1}, "c": 3}
    assert merge_overrides(base, overrides) == {"a": {"b": [1, 2], "keep": 1}, "c": None}
    assert base == {"a": {"b": 0, "keep": 1}, "c": 3}  # the parsed config is not changed in place
    with pytest.raises(ValueError, match="needs a value"):
        split_overrides(["--model.model_kwargs.a"])


def test_check_accepts_factories_taking_any_keyword():
    check_model_kwargs("lenet_mil", {"mil": "abmil", "mil_kwargs": {"embed_dim": 64}})
    with pytest.raises(ValueError, match=r"model_kwargs.mil_kwargs: model 'abmil' has no argument 'heads'"):
        check_model_kwargs("lenet_mil", {"mil": "abmil", "mil_kwargs": {"heads": 2}})
