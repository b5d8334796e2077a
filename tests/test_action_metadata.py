"""The gauge action a file's metadata states (flowplug.adapters.action_metadata).

The MILC sample file states "Symanzik 1x1 + 1x2 + 1x1x1 action", beta11 = 7.0,
u0 = 0.8441 (and 4+4 flavours of quarks): the reader gives the [action] table of
``milc-symanzik``, ``flowplug info`` prints it, and the table builds the action.
Synthetic headers cover MILC's other descriptions and tmLQCD's xlf-info.
"""

from __future__ import annotations

import json

import pytest

from flowplug import io
from flowplug.adapters.action_metadata import stated_action
from flowplug.adapters.lime import _key_values
from flowplug.cli import main
from flowplug.plugins.gauge_actions import IwasakiGaugeAction, MILCSymanzikAction, milc_coefficients
from flowplug.theory import action_from_config

MILC_TABLE = {"name": "milc-symanzik", "group": "su3", "beta": 7.0, "u0": 0.8441, "variant": "1loop"}


@pytest.fixture
def milc_file(shared_dir):
    return shared_dir / "ensembles" / "milc.lat.sample.l4444.ildg"


def test_the_milc_file_states_milcs_symanzik_action(milc_file, fresh_pm):
    header = io.read(milc_file).meta[0].header
    assert header["action"] == MILC_TABLE
    note = header["action_note"]
    assert "Symanzik 1x1 + 1x2 + 1x1x1 action" in note and "gauge.beta11" in note and "gauge.tadpole.u0" in note
    assert "quark.flavors1 = 4, quark.flavors2 = 4" in note and "not in this action" in note
    act = action_from_config(header["action"])
    assert isinstance(act, MILCSymanzikAction) and act.beta == 7.0 and act.u0 == 0.8441
    assert act.coefficients() == milc_coefficients(0.8441)
    # the quark description keeps its commas (MILC writes it quoted)
    assert header["xml_info"]["quark.description"] == (
        "O(a^2): couplings(pi)=0, Naik term, No O(a^2) errors, tadpole weights"
    )


def test_flowplug_info_prints_the_stated_action(milc_file, fresh_pm, capsys):
    assert main(["info", str(milc_file)]) == 0
    out = capsys.readouterr().out
    assert 'action        name = "milc-symanzik", group = "su3", beta = 7.0, u0 = 0.8441, variant = "1loop"' in out
    assert "gauge part only" in out
    assert main(["info", "--json", str(milc_file)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["action"] == MILC_TABLE and "dynamical quarks" in info["action_note"]


def test_the_stated_action_survives_conversion_to_hdf5(milc_file, tmp_path, fresh_pm, capsys):
    out = tmp_path / "milc.h5"
    assert main(["convert", str(milc_file), str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert io.read(out).meta[0].header["action"] == MILC_TABLE


def test_files_that_state_no_action(shared_dir, fresh_pm):
    nersc = io.read(shared_dir / "ensembles" / "simulateqcd.lat.sample.l6666_nersc").meta[0].header
    assert "action" not in nersc and "action_note" not in nersc
    assert stated_action({}) == (None, None)


def _milc(description, **extra):
    info = {"gauge.description": description, "gauge.beta11": 6.0, "gauge.tadpole.u0": 0.8788, **extra}
    return {"xml_info": info}


@pytest.mark.parametrize(
    "header,table",
    [
        (_milc('"Symanzik 1x1 + 1x2 + 1x1x1 action"'), dict(MILC_TABLE, beta=6.0, u0=0.8788)),
        (_milc("Symanzik 1x1 + 1x2 action"), dict(MILC_TABLE, beta=6.0, u0=0.8788, variant="tree")),
        (
            _milc("Symanzik 1x1 + 1x2 + 1x1x1 action with HISQ quark loops", **{"quark.dyn_flavors": "2 1 1"}),
            dict(MILC_TABLE, beta=6.0, u0=0.8788, variant="hisq", nf=4.0),
        ),
        (
            _milc("Symanzik 1x1 + 1x2 + 1x1x1 action with quark loops", **{"quark.flavors1": 2, "quark.flavors2": 1}),
            dict(MILC_TABLE, beta=6.0, u0=0.8788, variant="asqtad", nf=3.0),
        ),
        (_milc("Single plaquette action"), {"name": "wilson", "group": "su3", "beta": 6.0}),
        (_milc("One plaqette action with bc_flag 2"), None),
        (_milc("Symanzik 1x1 + 1x2 + 1x1x1 action with quark loops"), None),  # nf not stated
    ],
)
def test_milc_descriptions(header, table, fresh_pm):
    got, note = stated_action(header)
    assert got == table
    assert note and "gauge.description" in note
    if table is None:
        assert "not an action flowplug knows" in note or "not stated" in note
    else:
        action_from_config(got)  # every table builds its action


@pytest.mark.parametrize(
    "c2_rec,table",
    [
        (0.0, {"name": "wilson", "group": "su3", "beta": 5.3}),
        (-0.083333, {"name": "symanzik", "group": "su3", "beta": 5.3}),
        (-0.331, {"name": "iwasaki", "group": "su3", "beta": 5.3}),
        (-1.4088, {"name": "dbw2", "group": "su3", "beta": 5.3}),
        (-0.25, {"name": "plaquette-rectangle", "group": "su3", "beta": 5.3, "c1": -0.25}),
    ],
)
def test_tmlqcd_xlf_info(c2_rec, table, fresh_pm):
    got, note = stated_action({"xlf_info": {"beta": 5.3, "c2_rec": c2_rec, "kappa": 0.1632, "mu": 0.004}})
    assert got == table
    assert "c0 = 1 - 8 c1" in note and "kappa = 0.1632" in note
    act = action_from_config(got)
    if table["name"] == "iwasaki":
        assert isinstance(act, IwasakiGaugeAction)


def test_tmlqcd_unity_file(shared_dir, fresh_pm):
    """tmLQCD's unit-gauge test file states beta = 0, c2_rec = 0: Wilson at beta 0, as written."""
    header = io.read(shared_dir / "ensembles" / "tmlqcd.unity.l4444.lime").meta[0].header
    assert header["action"] == {"name": "wilson", "group": "su3", "beta": 0.0}


def test_key_values_splits_pairs_but_not_values():
    text = "plaquette = 0.5\n beta = 6.0, kappa = 0.177, mu = 0.5, c2_rec = 0.0\n date = Thu Aug 20 12:49:49 2020"
    assert _key_values(text) == {
        "plaquette": "0.5",
        "beta": "6.0",
        "kappa": "0.177",
        "mu": "0.5",
        "c2_rec": "0.0",
        "date": "Thu Aug 20 12:49:49 2020",
    }
    milc = 'gauge.description = "a, b = c"\nquark.description = O(a^2): couplings(pi)=0, Naik term, tadpole weights'
    assert _key_values(milc) == {
        "gauge.description": "a, b = c",
        "quark.description": "O(a^2): couplings(pi)=0, Naik term, tadpole weights",
    }


def test_written_descendants_do_not_inherit_the_stated_action(milc_file, fresh_pm):
    """resample/propose write new configurations with the input's records: the action the
    input states is not theirs (they follow the flow's target), so it is not carried."""
    from flowplug.jobs.output import _metadata

    source = io.read(milc_file).meta[0]
    meta = _metadata(source, 64, {"command": "resample"})
    assert "action" not in meta.header and "action_note" not in meta.header
    assert source.header["action"] == MILC_TABLE


def test_stated_action_mismatch_compares_name_and_named_couplings(milc_file, fresh_pm):
    """resample and propose compare the file's stated action with the one they sample."""
    from flowplug.jobs.chains import stated_action_mismatch

    ens = io.read(milc_file)
    assert stated_action_mismatch(ens, dict(MILC_TABLE)) is None  # the same action
    assert stated_action_mismatch(ens, {"name": "milc-symanzik", "beta": 7.0}) is None  # couplings not named
    said, want, note = stated_action_mismatch(ens, {"name": "wilson", "beta": 6.0, "group": "su3"})
    assert said.startswith("name = milc-symanzik") and "beta = 7.0" in said
    assert want == "name = wilson, beta = 6.0, group = su3"
    assert note is not None and "quark" in note
    said, want, _ = stated_action_mismatch(ens, {**MILC_TABLE, "beta": 6.5})  # same name, other coupling
    assert "beta = 7.0" in said and "beta = 6.5" in want
    lat = io.read(milc_file)
    lat.meta[0].header.pop("action")
    assert stated_action_mismatch(lat, {"name": "wilson"}) is None  # a file that states nothing
