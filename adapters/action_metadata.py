r"""The gauge action a file's metadata states, as flowplug's ``[action]`` table.

Production codes record the action an ensemble was generated with in the file's
metadata, each in its own words. :func:`stated_action` reads the words of the codes below
(format knowledge) and returns the ``[action]`` table of the flowplug action that is that
action (a registered name and its parameters, e.g. ``{"name": "milc-symanzik", "group":
"su3", "beta": 7.0, "u0": 0.8441, "variant": "1loop"}``), which
:func:`flowplug.theory.action_from_config` builds. The readers put it in the metadata
header under the standard key ``action`` (with ``action_note``: where it was read and
what it leaves out), and ``flowplug info FILE`` prints it.

MILC (``scidac-record-xml`` / ``scidac-file-xml`` ``<info>`` of QIO files; the native
``.info`` file uses the same keys):

================================================  =========================================
``gauge.description``                              flowplug action
================================================  =========================================
"Single plaquette action"                          ``wilson``, beta = ``gauge.beta11``
"Symanzik 1x1 + 1x2 action"                        ``milc-symanzik``, variant ``tree``
"Symanzik 1x1 + 1x2 + 1x1x1 action"                ``milc-symanzik``, variant ``1loop``
"... 1x1x1 action with quark loops"                ``milc-symanzik``, variant ``asqtad``, nf
"... 1x1x1 action with HISQ quark loops"           ``milc-symanzik``, variant ``hisq``, nf
================================================  =========================================

with beta = ``gauge.beta11`` and u0 = ``gauge.tadpole.u0``; nf (MILC's total_dyn_flavors)
is the sum of ``quark.dyn_flavors`` (or ``quark.flavors``, ``quark.flavors1``, ...).
Other descriptions (Schroedinger-functional boundaries, ``plaq_chair`` actions...) give
no table, and a note saying so.

tmLQCD (``xlf-info``): ``beta`` and ``c2_rec`` (tmLQCD's rectangle coefficient c1, with
c0 = 1 - 8 c1) give ``wilson`` (c2_rec = 0), ``symanzik`` (-1/12), ``iwasaki`` (-0.331),
``dbw2`` (-1.4088), or ``plaquette-rectangle`` with c1 = c2_rec; tmLQCD prints six
decimals, which is the tolerance of the match.

Only the gauge action is stated: an ensemble with dynamical quarks (MILC's
``quark.*`` keys, tmLQCD's ``kappa``/``mu``) has the quark determinant in its weight as
well, which no ``[action]`` table here includes; the note says so.

References:
    MILC code (milc-qcd/milc_qcd): ``generic/imp_actions/*.h`` (descriptions and loop
    coefficients), ``ks_imp_dyn/gauge_info.c`` and ``ks_imp_rhmc/gauge_info.c`` (keys);
    tmLQCD ``io/gauge_write_xlf_info.c`` (``xlf-info``) and ``read_input.l``
    (c0 = 1 - 8 c1).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

#: MILC ``gauge.description`` (lower case, blanks collapsed) -> milc-symanzik variant.
MILC_SYMANZIK_DESCRIPTIONS: dict[str, str] = {
    "symanzik 1x1 + 1x2 action": "tree",
    "symanzik 1x1 + 1x2 + 1x1x1 action": "1loop",
    "symanzik 1x1 + 1x2 + 1x1x1 action with quark loops": "asqtad",
    "symanzik 1x1 + 1x2 + 1x1x1 action with hisq quark loops": "hisq",
}

#: MILC ``gauge.description`` of the Wilson plaquette action.
MILC_PLAQUETTE_DESCRIPTIONS: tuple[str, ...] = ("single plaquette action",)

#: tmLQCD ``c2_rec`` -> registered plaquette + rectangle action (c1 of its record).
TMLQCD_RECTANGLE_ACTIONS: tuple[tuple[str, float], ...] = (
    ("wilson", 0.0),
    ("symanzik", -1.0 / 12.0),
    ("iwasaki", -0.331),
    ("dbw2", -1.4088),
)

#: tmLQCD writes c2_rec with "%f": six decimals.
TMLQCD_DECIMALS_TOLERANCE = 5.1e-7


def _norm(text: Any) -> str:
    return " ".join(str(text).strip().strip('"').lower().split())


def _number(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _milc_flavours(info: Mapping[str, Any]) -> tuple[float | None, str]:
    """(total dynamical flavours, the keys stating them) from MILC keys; (None, "") if none."""
    for key in ("quark.dyn_flavors", "quark.flavors"):
        if key in info:
            parts = str(info[key]).replace(",", " ").split()
            values = [_number(p) for p in parts]
            if values and all(v is not None for v in values):
                return float(sum(v for v in values if v is not None)), f"{key} = {info[key]}"
    numbered = sorted(k for k in info if re.fullmatch(r"quark\.flavors\d+", k))
    values = [_number(info[k]) for k in numbered]
    if values and all(v is not None for v in values):
        return float(sum(v for v in values if v is not None)), ", ".join(f"{k} = {info[k]}" for k in numbered)
    return None, ""


def _milc(info: Mapping[str, Any], group: str) -> tuple[dict[str, Any] | None, str]:
    """(table, note) from MILC ``<info>`` keys."""
    raw = info.get("gauge.description")
    desc = _norm(raw)
    where = f"MILC metadata: gauge.description = {str(raw).strip()!r}"
    beta = _number(info.get("gauge.beta11"))
    flavours, stated = _milc_flavours(info)
    quarks = ""
    if flavours:
        quarks = (
            f"; gauge part only: the ensemble has dynamical quarks ({stated}; quark.description = "
            f"{str(info.get('quark.description', '?')).strip()!r}), whose determinant is in its weight "
            "but not in this action"
        )
    if beta is None:
        return None, f"{where}, but no numeric gauge.beta11"
    if desc in MILC_PLAQUETTE_DESCRIPTIONS:
        return {"name": "wilson", "group": group, "beta": beta}, f"{where}, beta = gauge.beta11{quarks}"
    variant = MILC_SYMANZIK_DESCRIPTIONS.get(desc)
    if variant is None:
        return None, f"{where} is not an action flowplug knows (the action is not read)"
    u0 = _number(info.get("gauge.tadpole.u0"))
    if u0 is None:
        return None, f"{where}, but no numeric gauge.tadpole.u0"
    table: dict[str, Any] = {"name": "milc-symanzik", "group": group, "beta": beta, "u0": u0, "variant": variant}
    if variant in ("asqtad", "hisq"):
        if flavours is None:
            return None, f"{where}: its coefficients depend on the number of sea flavours, which is not stated"
        table["nf"] = flavours
    return table, f"{where}, beta = gauge.beta11, u0 = gauge.tadpole.u0{quarks}"


def _tmlqcd(info: Mapping[str, Any], group: str) -> tuple[dict[str, Any] | None, str]:
    """(table, note) from tmLQCD ``xlf-info`` keys."""
    beta = _number(info.get("beta"))
    c1 = _number(info.get("c2_rec", 0.0))
    where = "tmLQCD xlf-info: beta, c2_rec (= c1, c0 = 1 - 8 c1)"
    if beta is None or c1 is None:
        return None, f"{where}: no numeric beta or c2_rec"
    quarks = ""
    kappa = _number(info.get("kappa"))
    if kappa:
        mu = info.get("mu", info.get("2*kappa*mu", "?"))
        quarks = (
            f"; gauge part only: xlf-info also states kappa = {kappa:g}, mu = {mu} (dynamical twisted-mass "
            "quarks, not part of this action)"
        )
    for name, value in TMLQCD_RECTANGLE_ACTIONS:
        if abs(c1 - value) <= TMLQCD_DECIMALS_TOLERANCE:
            return {"name": name, "group": group, "beta": beta}, where + quarks
    return {"name": "plaquette-rectangle", "group": group, "beta": beta, "c1": c1}, where + quarks


def stated_action(header: Mapping[str, Any], *, group: str = "su3") -> tuple[dict[str, Any] | None, str | None]:
    """The ``[action]`` table the metadata of a file states, and a note on where it came from.

    Arguments:
        header: A reader's metadata header (:attr:`flowplug.ensemble.Metadata.header`) with
            MILC ``<info>`` keys under ``xml_info`` or tmLQCD ``xlf-info`` keys under
            ``xlf_info`` (module docstring).
        group: Gauge group of the file's links (``su3``, ``su2``), for the table.

    Returns:
        ``(table, note)``: ``table`` a dict with ``name`` (a registered action) and that
        action's parameters, ready for :func:`flowplug.theory.action_from_config`, or
        ``None`` when no action is stated or the stated one is unknown; ``note`` a sentence
        naming the keys it was read from and what the table leaves out (dynamical quarks),
        or why there is no table; ``(None, None)`` when the header states nothing about an
        action.
    """
    xml = header.get("xml_info")
    if isinstance(xml, Mapping) and "gauge.description" in xml:
        return _milc(xml, group)
    xlf = header.get("xlf_info")
    if isinstance(xlf, Mapping) and "beta" in xlf:
        return _tmlqcd(xlf, group)
    return None, None
