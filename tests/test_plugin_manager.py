"""Plugin manager: built-ins, entry-point discovery, tolerant/strict loading, registries."""

from __future__ import annotations

import dataclasses
import warnings

import pluggy
import pytest

import flowplug
from flowplug.errors import DuplicateComponentError, PluginError, PluginLoadWarning, UnknownComponentError
from flowplug.manager import builtin_modules, new_plugin_manager
from flowplug.records import ActionSpec, CommandSpec

from fakedist import activate, forget_modules, make_distribution

GOOD = """
    from flowplug import hookimpl, ActionSpec

    class Free:
        field = "scalar"
        def __init__(self, m2=1.0):
            self.m2 = m2

    @hookimpl
    def flowplug_actions():
        return [ActionSpec(name="free", aliases=("gaussian",), description="free field",
                           factory=Free, fields=("scalar",), parameters=("m2",))]
"""


def _good(tmp_path, monkeypatch, dist="fakegood", version="1.2", module="fakegood_plugin"):
    make_distribution(tmp_path, dist, version, {"free": module}, {module: GOOD})
    forget_modules(module)
    activate(tmp_path, monkeypatch)


def _pm(tmp_path, **kwargs):
    """A manager that discovers distributions under tmp_path only (isolated from the user's)."""
    paths = [str(tmp_path)] + [
        str(p) for p in sorted(tmp_path.iterdir()) if p.is_dir() and not p.name.endswith(".dist-info")
    ]
    return new_plugin_manager(autoload=True, path=paths, **kwargs)


def test_builtins_registered_in_fixed_order(fresh_pm):
    names = [name for name, _ in fresh_pm.list_name_plugin()]
    assert names == list(builtin_modules())
    assert names[0] == "flowplug.cli.commands"
    assert all(fresh_pm.provider_of(n)[0] == "flowplug" for n in names)


def test_entry_point_discovery_through_importlib_metadata(tmp_path, monkeypatch):
    _good(tmp_path, monkeypatch)
    pm = _pm(tmp_path)
    spec = pm.registry("action").get("free")
    assert (spec.provider, spec.provider_version) == ("fakegood", "1.2")
    assert pm.registry("action").get("GAUSSIAN") is spec  # alias, case-blind
    assert spec.factory(m2=0.5).m2 == 0.5


def test_autoload_disabled_by_environment(tmp_path, monkeypatch):
    _good(tmp_path, monkeypatch)
    monkeypatch.setenv("FLOWPLUG_DISABLE_PLUGIN_AUTOLOAD", "1")
    pm = new_plugin_manager(path=[str(tmp_path)])
    assert "free" not in pm.registry("action")
    monkeypatch.setenv("FLOWPLUG_DISABLE_PLUGIN_AUTOLOAD", "0")
    assert "free" in new_plugin_manager(path=[str(tmp_path)]).registry("action")


@pytest.mark.parametrize("blocked", ["free", "fake-good", "Fake_Good", "fake.good"])
def test_block_list_by_entry_point_or_distribution(tmp_path, monkeypatch, blocked):
    _good(tmp_path, monkeypatch, dist="fake-good")
    monkeypatch.setenv("FLOWPLUG_BLOCK_PLUGINS", f"other, {blocked}")
    pm = _pm(tmp_path)
    assert "free" not in pm.registry("action")
    monkeypatch.setenv("FLOWPLUG_BLOCK_PLUGINS", "other")
    assert "free" in _pm(tmp_path).registry("action")


def test_block_list_cannot_remove_builtins(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWPLUG_BLOCK_PLUGINS", "flowplug.cli.commands,flowplug")
    pm = _pm(tmp_path)
    assert "plugins" in pm.registry("command")


def test_broken_plugin_is_tolerated_with_one_warning(tmp_path, monkeypatch):
    _good(tmp_path, monkeypatch)
    make_distribution(
        tmp_path,
        "fakebroken",
        "0.3",
        {"broken": "fakebroken_plugin"},
        {"fakebroken_plugin": "import not_a_module_anywhere\n"},
    )
    forget_modules("fakebroken_plugin")
    activate(tmp_path, monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = _pm(tmp_path, strict=False)
    messages = [str(w.message) for w in caught if issubclass(w.category, PluginLoadWarning)]
    assert len(messages) == 1
    assert messages[0].startswith("flowplug plugin 'broken' (fakebroken 0.3) could not be loaded: ")
    assert "not_a_module_anywhere" in messages[0]
    assert pm.registry("action").get("free").provider == "fakegood"  # the rest works
    assert pm.failures and pm.failures[0][0] == "broken"


def test_broken_plugin_is_an_error_when_strict(tmp_path, monkeypatch):
    make_distribution(
        tmp_path,
        "fakebroken",
        "0.3",
        {"broken": "fakebroken_plugin"},
        {"fakebroken_plugin": "raise RuntimeError('boom at import')\n"},
    )
    forget_modules("fakebroken_plugin")
    activate(tmp_path, monkeypatch)
    monkeypatch.setenv("FLOWPLUG_STRICT_PLUGINS", "1")
    with pytest.raises(
        PluginError, match=r"'broken' \(fakebroken 0.3\) could not be loaded: RuntimeError: boom at import"
    ):
        _pm(tmp_path)


def test_hook_raising_in_third_party_plugin_is_tolerated(tmp_path, monkeypatch):
    source = """
        from flowplug import hookimpl
        @hookimpl
        def flowplug_actions():
            raise ValueError("no actions today")
    """
    make_distribution(tmp_path, "fakeraise", "2.0", {"raiser": "fakeraise_plugin"}, {"fakeraise_plugin": source})
    forget_modules("fakeraise_plugin")
    activate(tmp_path, monkeypatch)
    pm = _pm(tmp_path, strict=False)
    with pytest.warns(
        PluginLoadWarning, match="failed in flowplug_actions: ValueError: no actions today; its actions are skipped"
    ):
        pm.registry("action")
    strict = _pm(tmp_path, strict=True)
    with pytest.raises(
        PluginError, match=r"flowplug_actions of plugin 'raiser' \(fakeraise 2.0\) raised ValueError: no actions today"
    ):
        strict.registry("action")


def test_wrong_record_type_is_an_error(fresh_pm):
    class Bad:
        @flowplug.hookimpl
        def flowplug_actions(self):
            return [CommandSpec(name="oops", description="", factory=lambda p: None, run=lambda a: 0)]

    fresh_pm.register(Bad(), name="bad", provider=("badpkg", "0.1"))
    with pytest.warns(PluginLoadWarning, match=r"returned CommandSpec, expected ActionSpec"):
        fresh_pm.registry("action")
    fresh_pm.strict = True
    fresh_pm._registries = None  # rebuild in strict mode
    with pytest.raises(PluginError, match=r"'bad' \(badpkg 0.1\) returned CommandSpec, expected ActionSpec"):
        fresh_pm.registry("action")


def test_duplicate_name_names_both_providers(tmp_path, monkeypatch):
    _good(tmp_path, monkeypatch)
    (tmp_path / "second").mkdir()
    _good(tmp_path / "second", monkeypatch, dist="lattice-extras", version="0.3", module="extras_plugin")
    pm = _pm(tmp_path, strict=True)
    with pytest.raises(DuplicateComponentError) as info:
        pm.registry("action")
    assert str(info.value) == (
        "Action 'free' is provided twice: by fakegood 1.2 and by lattice-extras 0.3. "
        "Uninstall one of them or block it (FLOWPLUG_BLOCK_PLUGINS=lattice-extras)."
    )


def test_duplicate_is_skipped_with_warning_when_tolerant(tmp_path, monkeypatch):
    _good(tmp_path, monkeypatch)
    (tmp_path / "second").mkdir()
    _good(tmp_path / "second", monkeypatch, dist="lattice-extras", version="0.3", module="extras_plugin")
    pm = _pm(tmp_path, strict=False)
    with pytest.warns(PluginLoadWarning, match=r"\(lattice-extras 0.3\) skipped: Action 'free' is provided twice"):
        spec = pm.registry("action").get("free")
    assert spec.provider == "fakegood"  # the first one registered stays
    assert "plugins" in pm.registry("command")  # other kinds are unaffected


def test_duplicate_of_builtin_names_builtin(fresh_pm):
    class Clash:
        @flowplug.hookimpl
        def flowplug_commands(self):
            return [CommandSpec(name="plugins", description="mine", factory=lambda p: None, run=lambda a: 0)]

    fresh_pm.register(Clash(), name="clash", provider=("clashpkg", "4.5"))
    fresh_pm.strict = True
    with pytest.raises(DuplicateComponentError) as info:
        fresh_pm.registry("command")
    version = flowplug.__version__
    assert str(info.value).startswith(
        f"Command 'plugins' is provided twice: by flowplug {version} (built-in) and by clashpkg 4.5."
    )


def test_duplicate_alias_is_detected(fresh_pm):
    class A:
        @flowplug.hookimpl
        def flowplug_actions(self):
            return [
                ActionSpec(name="one", aliases=("same",), description="", factory=dict),
                ActionSpec(name="same", description="", factory=dict),
            ]

    fresh_pm.register(A(), name="a", provider=("apkg", "1"))
    fresh_pm.strict = True
    with pytest.raises(
        DuplicateComponentError, match=r"Action 'same' is provided twice: by apkg 1 \(alias of 'one'\) and by apkg 1"
    ):
        fresh_pm.registry("action")


def test_unknown_name_lists_available_and_suggests(tmp_path, monkeypatch):
    _good(tmp_path, monkeypatch)
    pm = _pm(tmp_path)
    with pytest.raises(UnknownComponentError) as info:
        pm.registry("action").get("fre")
    text = str(info.value)
    assert text.startswith("Unknown action 'fre'. Available: ")
    assert "free (from fakegood 1.2)" in text
    assert text.endswith("Did you mean 'free'?")
    with pytest.raises(UnknownComponentError, match=r"^Unknown flow layer 'nothing'\. Available: "):
        pm.registry("flow_layer").get("nothing")
    with pytest.raises(PluginError, match="unknown component kind 'layer'"):
        pm.registry("layer")


def test_misspelled_hook_is_an_error_naming_it(fresh_pm):
    class Typo:
        @flowplug.hookimpl
        def flowplug_actoins(self):
            return []

    fresh_pm.register(Typo(), name="typo", provider=("typopkg", "0.9"))
    with pytest.raises(PluginError) as info:
        fresh_pm.check_pending()
    assert str(info.value).startswith(
        "plugin 'typo' (typopkg 0.9) implements unknown hook 'flowplug_actoins' "
        "(did you mean 'flowplug_actions'?). Known hooks: flowplug_actions, "
    )


def test_misspelled_hook_in_entry_point_plugin(tmp_path, monkeypatch):
    source = """
        from flowplug import hookimpl
        @hookimpl
        def flowplug_observabels():
            return []
    """
    make_distribution(tmp_path, "faketypo", "1.0", {"typo": "faketypo_plugin"}, {"faketypo_plugin": source})
    forget_modules("faketypo_plugin")
    activate(tmp_path, monkeypatch)
    with pytest.warns(
        PluginLoadWarning, match=r"unknown hook 'flowplug_observabels' \(did you mean 'flowplug_observables'\?\)"
    ):
        pm = _pm(tmp_path, strict=False)
    assert pm.get_plugin("typo") is None
    pm.check_pending()  # nothing pending: the broken plugin was unregistered
    with pytest.raises(PluginError, match="faketypo 1.0"):
        _pm(tmp_path, strict=True)


def test_unmarked_hook_function_is_reported(tmp_path, monkeypatch):
    source = """
        def flowplug_actions():
            return []
    """
    make_distribution(
        tmp_path, "fakeunmarked", "1.0", {"unmarked": "fakeunmarked_plugin"}, {"fakeunmarked_plugin": source}
    )
    forget_modules("fakeunmarked_plugin")
    activate(tmp_path, monkeypatch)
    with pytest.warns(PluginLoadWarning, match=r"flowplug_actions not marked with @hookimpl"):
        _pm(tmp_path, strict=False)


def test_failing_monitor_does_not_stop_the_run(fresh_pm):
    calls = []

    class Failing:
        @flowplug.hookimpl
        def flowplug_after_train_step(self, step, metrics):
            raise RuntimeError("disk full")

    class Good:
        @flowplug.hookimpl
        def flowplug_after_train_step(self, step, metrics):
            calls.append(step)

    fresh_pm.register(Good(), name="good")
    fresh_pm.register(Failing(), name="failing", provider=("monitorpkg", "1.0"))
    with pytest.warns(
        PluginLoadWarning,
        match=r"'failing' \(monitorpkg 1.0\) raised in flowplug_after_train_step: RuntimeError: disk full",
    ):
        fresh_pm.notify("flowplug_after_train_step", step=7, metrics={})
    assert calls == [7]
    fresh_pm.strict = True
    with pytest.raises(PluginError, match="disk full"):
        fresh_pm.notify("flowplug_after_train_step", step=8, metrics={})
    with pytest.raises(PluginError, match="not an event hook"):
        fresh_pm.notify("flowplug_actions")


def test_wrong_hook_signature_is_rejected(fresh_pm):
    class WrongArgs:
        @flowplug.hookimpl
        def flowplug_after_train_step(self, step, metrics, extra):
            pass

    with pytest.raises(pluggy.PluginValidationError):
        fresh_pm.register(WrongArgs(), name="wrong")


def test_record_names_must_be_lower_case():
    with pytest.raises(ValueError, match="not a lower-case identifier"):
        ActionSpec(name="Wilson", description="", factory=dict)
    with pytest.raises(TypeError, match="not callable"):
        ActionSpec(name="wilson", description="", factory=None)


def test_records_are_frozen():
    spec = ActionSpec(name="a", description="", factory=dict)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "b"
