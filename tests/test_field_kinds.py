"""Field kinds come from plugins (hook ``flowplug_field_kinds``), not from the core.

A third-party plugin registers a family of kinds with its own field space, an action
and an observable on it; HMC runs on it exactly, and every lookup by kind (field_space,
default observables, measurement, flow shape checks) finds it. Clashes name both
providers; unknown kinds list what exists.
"""

from __future__ import annotations

import pytest
import torch

import flowplug
from flowplug import FieldKindSpec, ObservableSpec, hookimpl
from flowplug.errors import (
    ConfigError,
    DuplicateComponentError,
    PluginError,
    PluginLoadWarning,
    UnknownComponentError,
    UnknownFieldKindError,
)
from flowplug.flow import check_field, default_prior
from flowplug.measure import default_observables, measurement
from flowplug.plugins.hmc import HMC
from flowplug.stats import gamma_method
from flowplug.theory import Action, AngleSpace, EuclideanSpace, SUNSpace, field_kind, field_space, kind_accepted, su_n

# ------------------------------------------------------------------- a toy plugin


class VectorSpace(EuclideanSpace):
    """N real components per site: shape (B, L_0, ..., L_{d-1}, N), float64."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.kind = f"vec{n}"

    def shape(self, lattice, batch):
        return (batch, *map(int, lattice), self.n)

    def lattice_of(self, x):
        if x.dim() < 3 or x.shape[-1] != self.n or x.is_complex():
            raise flowplug.ShapeError(f"{self.kind} fields have shape (B, L..., {self.n}); found {tuple(x.shape)}")
        return tuple(x.shape[1:-1])


class GaussianVector(Action):
    """S = (m2 / 2) sum_x |phi_x|^2: every component is N(0, 1/m2) (exact <phi^2> = 1/m2)."""

    parameters = ("m2",)

    def __init__(self, m2: float = 0.5, field: str = "vec3") -> None:
        self.m2 = float(m2)
        self.field = field

    def action(self, x):
        self.check(x)
        return 0.5 * self.m2 * (x**2).flatten(1).sum(1).to(torch.float64)


def vec_sq(x):
    """Mean of phi^2 over sites and components, (B,) float64."""
    return (x**2).flatten(1).mean(1).to(torch.float64)


class ToyFields:
    """A third-party plugin: the family vec<N> (N >= 1), and an observable declared for it."""

    @hookimpl
    def flowplug_field_kinds(self):
        return [
            FieldKindSpec(
                name="vec",
                description="N-component real field per site",
                factory=VectorSpace,
                pattern=r"vec(?P<n>[1-9]\d*)",
                examples=("vec2", "vec3"),
                observables=("vec_sq",),
                observable_dims={"vec_sq": (1, 2)},
            )
        ]

    @hookimpl
    def flowplug_observables(self):
        return [ObservableSpec(name="vec_sq", description="mean phi^2", factory=vec_sq, fields=("vec",))]


@pytest.fixture
def toy(fresh_pm):
    fresh_pm.register(ToyFields(), name="toy", provider=("toy-fields", "1.0"))
    return fresh_pm


# ------------------------------------------------------------------------- lookup


def test_builtin_kinds_come_from_the_fields_plugin(fresh_pm):
    reg = fresh_pm.registry("field_kind")
    assert reg.names() == ["o2", "scalar", "su", "u1"]
    assert {r.plugin for r in reg} == {"flowplug.plugins.fields"}
    assert isinstance(field_space("scalar"), EuclideanSpace) and not field_space("scalar").gauge
    assert isinstance(field_space("o2"), AngleSpace) and not field_space("o2").gauge
    assert isinstance(field_space("u1"), AngleSpace) and field_space("u1").gauge
    for n in (2, 3, 5):
        space = field_space(f"su{n}")
        assert isinstance(space, SUNSpace) and space.n == n and space.gauge and space.kind == f"su{n}"
    assert reg.get("SU4") is reg.get("su") and "su7" in reg and "so3" not in reg
    assert field_kind("su9").prior == "haar" and default_prior("u1") == "uniform"
    assert (su_n("su4"), su_n("u1"), su_n("su1"), su_n("nothing")) == (4, None, None, None)
    with pytest.raises(ConfigError, match="N >= 2"):
        field_space("su1")
    with pytest.raises(
        UnknownFieldKindError,
        match=r"'su' names a family, su \(su2, su3, \.\.\.\) \(from "
        r"flowplug .* \(built-in\)\); give one of its members",
    ):
        field_space("su")


def test_default_observables_follow_the_records(fresh_pm):
    assert default_observables("scalar", 3) == ("magnetization", "abs_magnetization", "chi_2", "ising_energy")
    assert default_observables("u1", 2) == ("plaquette", "topological_charge")
    assert default_observables("u1", 4) == ("plaquette",)
    for kind in ("su2", "su3", "su4"):  # the clover charge is defined for every SU(N) in 4D
        assert default_observables(kind, 4) == ("plaquette", "topological_charge")
        assert default_observables(kind, 2) == ("plaquette",)
    assert default_observables("o2", 2) == () and default_observables("nothing", 2) == ()
    # an observable declared for su2/su3 measures every member of the family
    links = field_space("su4").cold((2, 2), 3)
    assert torch.equal(measurement("su4", ["plaquette"])(links)["plaquette"], torch.ones(3, dtype=torch.float64))
    assert kind_accepted("su4", ("u1", "su2")) and kind_accepted("su4", ("su",))
    assert not kind_accepted("u1", ("su2", "su3")) and not kind_accepted("nothing", ("su3",))


def test_unknown_kind_lists_what_exists(toy):
    with pytest.raises(UnknownFieldKindError) as info:
        field_space("so3")
    assert isinstance(info.value, ConfigError) and isinstance(info.value, UnknownComponentError)
    text = str(info.value)
    assert text.startswith(
        "unknown field kind 'so3'. Available: o2, scalar, su (su2, su3, ...), u1, "
        "vec (vec2, vec3, ...) (from toy-fields 1.0). Did you mean 'su3'?"
    )
    assert "flowplug_field_kinds" in text
    with pytest.raises(UnknownComponentError, match=r"^Unknown field kind 'vec0'\. Available: "):
        flowplug.get_component("field_kind", "vec0")
    with pytest.raises(ConfigError, match="no default prior for field kind 'vec3'"):
        default_prior("vec3")


# ------------------------------------------------------------- a third-party kind


def test_third_party_kind_is_found_everywhere(toy):
    spec = flowplug.get_component("field_kind", "VEC3")
    assert (spec.name, spec.provider, spec.provider_version) == ("vec", "toy-fields", "1.0")
    space = field_space("vec3")
    assert isinstance(space, VectorSpace) and space.n == 3 and not space.gauge
    assert space.shape((4, 2), 5) == (5, 4, 2, 3)
    assert field_space("vec12").n == 12
    action = GaussianVector(field="vec3")
    assert action.cold_start((4, 2), 2).shape == (2, 4, 2, 3)
    assert default_observables("vec3", 2) == ("vec_sq",) and default_observables("vec3", 3) == ()
    x = action.hot_start((4, 2), 2, generator=torch.Generator().manual_seed(0))
    assert set(measurement("vec3", ["vec_sq"])(x)) == {"vec_sq"}
    with pytest.raises(ConfigError, match="not for field kind 'u1'"):
        measurement("u1", ["vec_sq"])
    flow = type("F", (), {"field": "vec3", "lattice": (4, 2)})
    check_field(flow, x)
    with pytest.raises(flowplug.ShapeError, match=r"expects shape \(B, 4, 2, 3\)"):
        check_field(flow, x[..., :2])
    with pytest.raises(flowplug.ShapeError, match="vec3 fields have shape"):
        action.action(torch.zeros(1, 4, 2, 2, dtype=torch.float64))


def test_hmc_runs_exactly_on_a_third_party_kind(toy, one_thread):
    """HMC moves on the plugin's space: <phi^2> = 1/m2 = 2 for the Gaussian action.

    Seed 5; 16 chains of 300 leapfrog trajectories (3 steps, tau = 1.5; the first 30
    dropped) on a 4x4 lattice of 3-component vectors (48 Gaussian variables each);
    5 Gamma-method sigma.
    """
    m2 = 0.5
    action = GaussianVector(m2=m2, field="vec3")
    kernel = HMC(action, integrator="leapfrog", steps=3, trajectory_length=1.5)
    assert isinstance(kernel.space, VectorSpace)
    g = torch.Generator().manual_seed(5)
    state = kernel.init(action.hot_start((4, 4), 16, generator=g))
    measure = measurement("vec3", default_observables("vec3", 2))
    rows, accepted, boltzmann = [], [], []
    for step in range(300):
        state, info = kernel.step(state, g)
        accepted.append(info["accepted"].double().mean().item())
        boltzmann.append(torch.exp(-info["delta_h"]).mean().item())
        if step >= 30:
            rows.append(measure(state.x)["vec_sq"])
    assert state.x.shape == (16, 4, 4, 3)
    data = torch.stack(rows)  # (steps, chains)
    res = gamma_method(data.numpy(), step_axis=0)
    assert abs(res.mean - 1 / m2) < 5 * res.error, (res.mean, res.error)
    assert 0.5 < sum(accepted) / len(accepted) < 1  # Metropolis rejects some leapfrog trajectories
    # <exp(-dH)> = 1: 4800 trajectories with small dH, a loose bound
    assert abs(sum(boltzmann) / len(boltzmann) - 1) < 0.05


# ---------------------------------------------------------------------- clashes


def _plugin(*records):
    class P:
        @hookimpl
        def flowplug_field_kinds(self):
            return list(records)

    return P()


def test_duplicate_kind_names_both_providers(fresh_pm):
    fresh_pm.register(
        _plugin(FieldKindSpec(name="u1", description="mine", factory=EuclideanSpace)),
        name="clash",
        provider=("clashpkg", "2.0"),
    )
    fresh_pm.strict = True
    with pytest.raises(DuplicateComponentError) as info:
        fresh_pm.registry("field_kind")
    assert str(info.value) == (
        f"Field kind 'u1' is provided twice: by flowplug {flowplug.__version__} (built-in) and by "
        "clashpkg 2.0. Uninstall one of them or block it (FLOWPLUG_BLOCK_PLUGINS=clashpkg)."
    )


def test_kind_in_a_builtin_family_is_a_duplicate(fresh_pm):
    fresh_pm.register(
        _plugin(FieldKindSpec(name="su5", description="mine", factory=lambda: SUNSpace(5), gauge=True)),
        name="clash",
        provider=("clashpkg", "2.0"),
    )
    fresh_pm.strict = True
    with pytest.raises(
        DuplicateComponentError,
        match=r"^Field kind 'su5' is provided twice: by flowplug .* \(built-in\) \(family 'su', "
        r".*\) and by clashpkg 2\.0\.",
    ):
        fresh_pm.registry("field_kind")


def test_duplicate_is_skipped_with_warning_when_tolerant(fresh_pm):
    fresh_pm.register(
        _plugin(FieldKindSpec(name="scalar", description="mine", factory=EuclideanSpace)),
        name="clash",
        provider=("clashpkg", "2.0"),
    )
    with pytest.warns(PluginLoadWarning, match=r"\(clashpkg 2.0\) skipped: Field kind 'scalar' is provided twice"):
        spec = fresh_pm.registry("field_kind").get("scalar")
    assert spec.provider == "flowplug"


def test_overlapping_families_name_both_providers(fresh_pm):
    fresh_pm.register(
        _plugin(
            FieldKindSpec(name="w", description="w<N>", factory=VectorSpace, pattern=r"w(?P<n>\d+)", examples=("w1",))
        ),
        name="one",
        provider=("onepkg", "1"),
    )
    fresh_pm.register(
        _plugin(FieldKindSpec(name="wide", description="w5..w9", factory=VectorSpace, pattern=r"w(?P<n>[5-9])")),
        name="two",
        provider=("twopkg", "2"),
    )
    fresh_pm.strict = True
    assert field_space("w1").n == 1  # only the first family covers w1
    with pytest.raises(
        DuplicateComponentError,
        match=r"Field kind 'w7' is provided twice: by onepkg 1 \(family 'w', .*\) "
        r"and by twopkg 2 \(family 'wide', .*\)",
    ):
        field_space("w7")
    fresh_pm.register(
        _plugin(FieldKindSpec(name="v", description="", factory=VectorSpace, pattern=r"w(?P<n>1)", examples=("w1",))),
        name="three",
        provider=("threepkg", "3"),
    )
    with pytest.raises(
        DuplicateComponentError,
        match=r"Field kind 'w1' is provided twice: by onepkg 1 .* "
        r"and by threepkg 3",
    ):
        fresh_pm.registry("field_kind")


# --------------------------------------------------------------------- records


def test_record_validation():
    with pytest.raises(ValueError, match="not a regular expression"):
        FieldKindSpec(name="bad", description="", factory=EuclideanSpace, pattern="bad(")
    with pytest.raises(ValueError, match="does not match"):
        FieldKindSpec(name="v", description="", factory=VectorSpace, pattern=r"v(?P<n>\d+)", examples=("w2",))
    with pytest.raises(ValueError, match="give a pattern"):
        FieldKindSpec(name="v", description="", factory=VectorSpace, examples=("v2",))
    with pytest.raises(ValueError, match="lower-case"):
        FieldKindSpec(name="Vec", description="", factory=VectorSpace)
    spec = FieldKindSpec(
        name="v",
        description="",
        factory=VectorSpace,
        pattern=r"v(?P<n>\d+)(?P<tag>[a-z]?)",
        observables=("a", "b"),
        observable_dims={"b": [3]},
    )
    assert spec.match("V4x") == {"n": 4, "tag": "x"} and spec.match("w4") is None
    assert spec.observable_dims == (("b", (3,)),) and hash(spec)
    assert spec.default_observables(2) == ("a",) and spec.default_observables(3) == ("a", "b")
    assert spec.summary()["pattern"] == spec.pattern and spec.summary()["observable_dims"] == {"b": [3]}
    with pytest.raises(LookupError):
        spec.build("w4")


def test_a_space_must_match_its_record(fresh_pm):
    fresh_pm.register(
        _plugin(
            FieldKindSpec(name="liar", description="says gauge", factory=EuclideanSpace, gauge=True),
            FieldKindSpec(name="nospace", description="builds a dict", factory=dict),
            FieldKindSpec(name="broken", description="factory fails", factory=lambda: 1 / 0),
        ),
        name="bad",
        provider=("badpkg", "0.1"),
    )
    with pytest.raises(PluginError, match="field kind 'liar' of badpkg 0.1: the record says gauge=True"):
        field_space("liar")
    with pytest.raises(PluginError, match="'nospace' of badpkg 0.1: its factory returned dict"):
        field_space("nospace")
    with pytest.raises(PluginError, match="'broken' of badpkg 0.1: its factory raised ZeroDivisionError"):
        field_space("broken")


def test_plugins_command_lists_field_kinds(toy, capsys):
    import json

    from flowplug.cli import main

    assert main(["plugins", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out) if r["kind"] == "field_kind"}
    assert set(rows) == {"o2", "scalar", "su", "u1", "vec"}
    assert rows["su"]["gauge"] and rows["su"]["examples"] == ["su2", "su3"]
    assert rows["vec"]["provider"] == "toy-fields" and rows["vec"]["observables"] == ["vec_sq"]
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("field kind") and "su: su2, su3, ..." in line for line in out)
    assert any(
        line.startswith("field kind") and "vec: vec2, vec3, ..." in line and "toy-fields 1.0" in line for line in out
    )
