"""Every component hook is collected into its typed registry with provider stamps."""

from __future__ import annotations

import pytest

import flowplug
from flowplug.records import (
    ActionSpec,
    CommandSpec,
    DiracOperatorSpec,
    FieldKindSpec,
    FileFormatSpec,
    FlowLayerSpec,
    KernelSpec,
    ObservableSpec,
    PriorSpec,
    PseudofermionModelSpec,
)
from flowplug.theory import EuclideanSpace


class Everything:
    """A third-party-style plugin implementing each component hook once."""

    @flowplug.hookimpl
    def flowplug_field_kinds(self):
        return [FieldKindSpec(name="t-kind", description="test field kind", factory=EuclideanSpace)]

    @flowplug.hookimpl
    def flowplug_actions(self):
        return [ActionSpec(name="t-action", description="test action", factory=dict, fields=("scalar",))]

    @flowplug.hookimpl
    def flowplug_flow_layers(self):
        return [FlowLayerSpec(name="t-layer", description="test layer", factory=dict, fields=("scalar",))]

    @flowplug.hookimpl
    def flowplug_priors(self):
        return [PriorSpec(name="t-prior", description="test prior", factory=dict, fields=("scalar",))]

    @flowplug.hookimpl
    def flowplug_kernels(self):
        return [KernelSpec(name="t-kernel", description="test kernel", factory=dict)]

    @flowplug.hookimpl
    def flowplug_file_formats(self):
        return [
            FileFormatSpec(name="t-format", description="test format", factory=dict, extensions=("tf",), writable=True)
        ]

    @flowplug.hookimpl
    def flowplug_observables(self):
        return [ObservableSpec(name="t-observable", description="test observable", factory=len)]

    @flowplug.hookimpl
    def flowplug_dirac_operators(self):
        return [DiracOperatorSpec(name="t-dirac", description="test Dirac operator", factory=dict, fields=("u1",))]

    @flowplug.hookimpl
    def flowplug_pseudofermion_models(self):
        return [PseudofermionModelSpec(name="t-pf-model", description="test pseudofermion model", factory=dict)]

    @flowplug.hookimpl
    def flowplug_commands(self):
        return [CommandSpec(name="t-command", description="test command", factory=lambda p: None, run=lambda a: 0)]


@pytest.mark.parametrize(
    "kind, name, record_type",
    [
        ("field_kind", "t-kind", FieldKindSpec),
        ("action", "t-action", ActionSpec),
        ("flow_layer", "t-layer", FlowLayerSpec),
        ("prior", "t-prior", PriorSpec),
        ("kernel", "t-kernel", KernelSpec),
        ("file_format", "t-format", FileFormatSpec),
        ("observable", "t-observable", ObservableSpec),
        ("dirac_operator", "t-dirac", DiracOperatorSpec),
        ("pseudofermion_model", "t-pf-model", PseudofermionModelSpec),
        ("command", "t-command", CommandSpec),
    ],
)
def test_each_component_hook_feeds_its_registry(fresh_pm, kind, name, record_type):
    fresh_pm.register(Everything(), name="everything", provider=("everything-pkg", "2.1"))
    record = fresh_pm.registry(kind).get(name.upper())
    assert isinstance(record, record_type)
    assert (record.provider, record.provider_version) == ("everything-pkg", "2.1")
    assert record.summary()["kind"] == kind
    assert name in fresh_pm.registry(kind).names()
    assert any(r is record for r in fresh_pm.components())


def test_unregister_forgets_components(fresh_pm):
    fresh_pm.register(Everything(), name="everything")
    assert "t-action" in fresh_pm.registry("action")
    fresh_pm.unregister(name="everything")
    assert "t-action" not in fresh_pm.registry("action")
