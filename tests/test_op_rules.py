"""The op-rule table: built-in rules are plain functions, and a user's function registered with
``register_op_rule`` teaches the tracer an op it did not know."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import export_and_check, randomize
from torch import nn

from lightning_prune import apply_masks, register_op_rule
from lightning_prune.core.trace import op_rules

IMAGE = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def table(monkeypatch):
    """A private copy of the table for the test: registrations do not leak into other tests."""
    monkeypatch.setattr(op_rules, "TABLE", dict(op_rules.TABLE))
    return op_rules.TABLE


class Cumulative(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.conv = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).cumsum(self.dim))


def cumsum_rule(tracer, call) -> None:
    """A running sum along one dim: the layout is kept unless the dim is the channels'."""
    rep = tracer.rep(call.args[0])
    if call.arg(1, "dim") % call.args[0].ndim in rep.dims:
        tracer.give_up(call, "sums along their dim")
    else:
        tracer.set_rep(call.out, rep)


def test_every_built_in_rule_is_a_plain_function_in_the_table() -> None:
    assert set(op_rules.RULES) >= {"elementwise", "movement", "conv", "linear", "write", "layer_norm"}
    assert all(callable(rule) and op_rules.RULES[name] is rule for name, rule in op_rules.RULES.items())
    assert set(op_rules.TABLE.values()) <= set(op_rules.RULES.values())
    assert op_rules.rule_for("conv2d") is op_rules.rule_for("conv3d") is op_rules.RULES["conv"]
    assert op_rules.rule_for(op_rules.normalise_op_name("__iadd__")) is op_rules.RULES["elementwise"]
    assert op_rules.rule_for("cumsum") is None


def test_a_user_function_rule_teaches_the_tracer_an_op(table) -> None:
    model = randomize(Cumulative(dim=2))
    masks = {"conv": torch.arange(8) < 3}
    with pytest.warns(UserWarning, match="op 'cumsum' is not understood"):
        result = export_and_check(apply_masks(model, masks), masks, IMAGE)
    assert result.model.conv.out_channels == 8  # unknown: kept

    register_op_rule("cumsum", cumsum_rule)
    assert op_rules.rule_for("cumsum") is cumsum_rule
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = export_and_check(apply_masks(model, masks), masks, IMAGE)
    assert result.model.conv.out_channels == result.model.head.in_channels == 3
    assert not [n for n in result.notes if n.action == "kept"]


def test_a_user_rule_that_gives_up_keeps_the_channels_with_its_reason(table) -> None:
    register_op_rule("cumsum", cumsum_rule)
    model = randomize(Cumulative(dim=1))
    masks = {"conv": torch.arange(8) < 3}
    result = export_and_check(apply_masks(model, masks), masks, IMAGE)
    assert result.model.conv.out_channels == 8
    assert [(n.layer, n.channels, n.reason) for n in result.notes if n.action == "kept"] == [
        ("conv", 5, "op 'cumsum' sums along their dim"),
    ]


def test_a_rule_name_still_registers_the_built_in_rule(table) -> None:
    register_op_rule("my_gelu", "elementwise")
    assert op_rules.rule_for("my_gelu") is op_rules.RULES["elementwise"]


def test_register_op_rule_rejects_what_is_not_a_rule(table) -> None:
    with pytest.raises(ValueError, match="Unknown rule 'pointwise' for op 'x'; choose one of elementwise"):
        register_op_rule("x", "pointwise")
    with pytest.raises(TypeError, match="must be a rule name or a function rule"):
        register_op_rule("x", 3)
    assert "x" not in op_rules.TABLE
