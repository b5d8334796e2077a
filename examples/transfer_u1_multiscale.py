"""Train a u1-multiscale flow on a larger lattice, starting from one trained on a smaller lattice.

    python examples/transfer_u1_multiscale.py --from runs/u1-b6-l8 --config examples/train_u1_b6_l16.toml
    python examples/transfer_u1_multiscale.py --from runs/u1-b6-l8 --config examples/train_u1_b6_l16.toml \\
        --set 'lattice=[32, 32]' --set out=\\"runs/u1-b6-l32\\" --set train.steps=300

The exact conditional of a child loop given its parent depends only on the two areas (and
beta), and each level of ``u1-multiscale`` has one conditioner shared by all its blocks; so a
level of the large lattice takes the network of the small lattice's level with the same block
shape (:func:`flowplug.plugins.flow_multiscale.transfer_multiscale`; both configurations need
the same layer options: ``n_bins``, ``hidden``, ``n_modes``, ``concentrate``, ``centre``,
``shift``). With ``levels = 6`` the large lattice transforms the six finest levels, exactly the
six levels of 8 x 8, and leaves the coarser (nearly uniform) ones to the prior.

Everything else is ``flowplug train``: the same configuration keys and ``--set`` overrides, the
same run directory (``checkpoint.pt``, ``summary.json``; ``flowplug train --resume``,
``flowplug sample`` and the other samplers read it as any run). ``train.steps = 0`` evaluates the
transferred flow without training.
"""

from __future__ import annotations

import argparse
import contextlib
import sys


@contextlib.contextmanager
def _transferring(source: str):
    """Make the trainer built by ``flowplug train`` start from ``source``'s levels."""
    import flowplug.train as train_module
    from flowplug.plugins.flow_multiscale import transfer_multiscale

    build = train_module.build_trainer

    def build_and_transfer(*args, **kwargs):
        trainer = build(*args, **kwargs)
        copied = transfer_multiscale(source, trainer.flow)
        levels = [trainer.flow.layers[j].level for j, _ in copied]
        print(f"initialised {len(copied)} layers (levels {levels}) from {source}", file=sys.stderr)
        return trainer

    train_module.build_trainer = build_and_transfer
    try:
        yield
    finally:
        train_module.build_trainer = build


def main(argv: list[str] | None = None) -> int:
    from flowplug import config as _config
    from flowplug.jobs.train import DEFAULT_CONFIG, OPEN_TABLES, run_train

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", required=True, help="trained run directory or checkpoint")
    parser.add_argument("--config", required=True, help="TOML configuration of the new run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--force", action="store_true", help="overwrite a checkpoint in the output directory")
    args = parser.parse_args(argv)
    cfg = _config.build_config(
        DEFAULT_CONFIG, config_file=args.config, overrides=args.overrides, open_tables=OPEN_TABLES
    )
    cfg["train"]["progress"] = False
    with _transferring(args.source):
        s = run_train(cfg, force=args.force)
    print(
        f"steps {s['steps']} (rollbacks {s['rollbacks']}), ESS {s['ess']:.4f}, acceptance {s['acceptance']:.4f}, "
        f"free energy {s['free_energy']:.4f}, {s['steps_per_s'] or 0:.2f} steps/s, "
        f"{s['wall_time_s']:.1f} s training -> {cfg['out']}/summary.json"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
