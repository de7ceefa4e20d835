"""`posttrain.registry.Registry`: names, duplicates, "did you mean", declared attributes."""

from __future__ import annotations

import pytest

from posttrain.errors import ConfigError
from posttrain.registry import Registry


def test_register_get_and_names():
    reg = Registry("widget")

    @reg.register("b")
    def b():
        return "b"

    reg.register("a")(lambda: "a")
    assert reg.get("b") is b
    assert reg.names() == ["a", "b"] == list(reg)
    assert "a" in reg and "c" not in reg and len(reg) == 2


def test_a_name_registered_twice_raises_and_keeps_the_first():
    reg = Registry("widget", attrs={"fast": False})
    first = reg.register("a", fast=True)(lambda: 1)

    def second():
        return 2

    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.register("a")(second)
    assert reg.get("a") is first
    assert reg.attr("a", "fast") is True
    assert not hasattr(second, "fast")  # the refused function is left untouched


def test_unknown_name_lists_the_known_ones_and_suggests_the_closest():
    reg = Registry("widget")
    reg.register("token-mean")(lambda: 0)
    reg.register("seq-mean")(lambda: 0)
    with pytest.raises(ConfigError, match=r"unknown widget 'token_mean'; known: seq-mean, "
                                          r"token-mean\. Did you mean 'token-mean'\?"):
        reg.get("token_mean")
    with pytest.raises(ConfigError, match="unknown widget 'zzz'"):
        reg.attr("zzz", "fast")


def test_declared_attributes_have_defaults_and_are_set_on_the_function():
    reg = Registry("estimator", attrs={"needs_values": False, "needs_groups": False})

    @reg.register("gae", needs_values=True)
    def gae():
        pass

    @reg.register("plain")
    def plain():
        pass

    assert reg.attr("gae", "needs_values") is True
    assert reg.attr("gae", "needs_groups") is False
    assert reg.attr("plain", "needs_values") is False
    assert (gae.needs_values, gae.needs_groups) == (True, False)
    # an undeclared key: the default if one is given, else KeyError
    assert reg.attr("gae", "colour", "red") == "red"
    with pytest.raises(KeyError, match="colour"):
        reg.attr("gae", "colour")


def test_an_undeclared_attribute_is_refused_at_registration():
    reg = Registry("estimator", attrs={"needs_values": False})
    with pytest.raises(ValueError, match=r"unknown attribute.*needs_critic.*needs_values"):
        reg.register("x", needs_critic=True)
    assert "x" not in reg
    with pytest.raises(ValueError, match="declared: none"):
        Registry("plain").register("x", fast=True)


def test_the_registry_record_survives_a_function_registered_twice():
    # one function under two names with different attributes: the function attribute holds
    # the last value, `attr` the value of each name
    reg = Registry("loss", attrs={"needs_off_policy": False})

    def loss():
        pass

    reg.register("on", needs_off_policy=False)(loss)
    reg.register("off", needs_off_policy=True)(loss)
    assert reg.attr("on", "needs_off_policy") is False
    assert reg.attr("off", "needs_off_policy") is True
