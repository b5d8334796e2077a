"""Exception and warning types raised by flowplug and its plugins.

Every error flowplug raises on bad input derives from :class:`FlowplugError`, so a
script (and the CLI, which turns them into exit code 1 with a one-paragraph message)
can catch them all at once. Messages name the file, record or plugin, the expected and
the found value, and what to do about it (DESIGN.md section 3).
"""

from __future__ import annotations


class FlowplugError(Exception):
    """Base class of all errors raised by flowplug on bad input or bad configuration."""


class PluginError(FlowplugError):
    """A plugin could not be loaded, is malformed, or clashes with another plugin."""


class UnknownComponentError(PluginError, LookupError):
    """A component name (action, flow layer, kernel, file format, ...) is not registered.

    The message lists the names that are available and the closest match.
    """


class DuplicateComponentError(PluginError):
    """Two plugins register a component of the same kind under one name or alias.

    The message names both providers (distribution and version).
    """


class ConfigError(FlowplugError):
    """A configuration file or a ``--set`` override is invalid (unknown key, wrong type)."""


class UnknownFieldKindError(UnknownComponentError, ConfigError):
    """A field kind (``scalar``, ``u1``, ``su3``...) that no plugin registers
    (hook ``flowplug_field_kinds``); both a configuration and a lookup error.

    The message lists the kinds that are available and the closest match.
    """


class FormatError(FlowplugError):
    """A lattice file is malformed, truncated, or does not match what the caller asked for."""


class ChecksumError(FormatError):
    """A checksum, plaquette or link trace stored in a file disagrees with the data."""


class ShapeError(FlowplugError, ValueError):
    """A tensor has the wrong shape, dtype or layout for the operation asked of it."""


class ConvergenceError(FlowplugError):
    """An iterative solver (the conjugate gradient of a Dirac operator) did not reach its
    tolerance within its iteration limit; the message names the tolerance, the limit and
    the residual reached per batch element."""


class CheckpointError(FlowplugError):
    """A checkpoint cannot be read, or belongs to a different run than the one resumed."""


class NonFiniteParametersError(CheckpointError):
    """A flow's parameters hold NaN or Inf (a diverged training run).

    Raised when a trainer would write such a checkpoint (it writes none) and when a
    checkpoint holding them is loaded. The message names the file, the step and the
    offending parameters.
    """


class InverseCheckError(CheckpointError):
    """A flow's inverse does not undo its forward map (:func:`flowplug.flowtools.check_inverse`).

    log q computed through such an inverse is wrong, so samplers refuse the flow; the
    message names the checkpoint, the measured errors, the tolerances and the override.
    """


class RunLockedError(FlowplugError):
    """Another process is writing the run directory (``flowplug.fsutil.run_lock``)."""


class PluginLoadWarning(UserWarning):
    """A third-party plugin failed to load and was skipped (tolerant mode)."""


class NonUnitaryWarning(UserWarning):
    """Links read from a file deviate from the group by more than the precision allows."""


class PrecisionLossWarning(UserWarning):
    """A write at the source's 32-bit precision rounds values that need more bits
    (such as the rebuilt third row of a two-row NERSC file); precision 64 keeps them."""


class CouplingMismatchWarning(UserWarning):
    """A flow is used for an action other than the one it was trained for (``--set
    action.beta=...`` on ``sample``/``resample``): the chains stay exact, but the flow's
    acceptance is that of a proposal for another distribution."""


class InverseCheckWarning(UserWarning):
    """A flow failed the inverse check and is used anyway, because the caller opted out
    (``--no-check-inverse``, ``check_inverse=False``)."""
