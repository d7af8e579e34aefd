"""Options and key=value overrides mix in any order (issue 10)."""

import pytest

from fibecfed.cli import build_parser, parse_args


def _parse(argv):
    return parse_args(build_parser(), argv)


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "method=fibecfed", "--out", "D", "data.name=sst2"],
        ["run", "--out", "D", "method=fibecfed", "data.name=sst2"],
        ["run", "method=fibecfed", "data.name=sst2", "--out", "D"],
    ],
)
def test_run_accepts_any_order(argv):
    args = _parse(argv)
    assert args.out == "D"
    assert args.overrides == ["method=fibecfed", "data.name=sst2"]


def test_compare_accepts_any_order():
    args = _parse(["compare", "federation.rounds=2", "--seeds", "0,1", "data.name=sst2", "--methods", "fedavg"])
    assert (args.seeds, args.methods) == ("0,1", "fedavg")
    assert args.overrides == ["federation.rounds=2", "data.name=sst2"]


def test_stray_word_is_still_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        _parse(["run", "method=fibecfed", "--out", "D", "oops"])
    assert exc.value.code == 2
    assert "unrecognized arguments: oops" in capsys.readouterr().err
