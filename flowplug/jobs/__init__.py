"""Jobs: the runs behind ``flowplug hmc``, ``sample``, ``resample``, ``train``, ``demo``, ``propose``: a Python API.

A **job** is one documented function that takes an effective configuration (a TOML
tree: the job's :data:`DEFAULT_CONFIG` with a user's file and ``--set`` overrides merged
in by :func:`flowplug.config.build_config`) and a few arguments, writes a run directory,
and returns the figures it wrote to ``<out>/summary.json``. The job owns its
configuration schema (``DEFAULT_CONFIG``, printed by ``flowplug <job> --print-config``);
the command-line files ``flowplug/cli/cmd_<job>.py`` only parse arguments, call the job
and print. A job holds the lock of its run directory while it runs
(:func:`flowplug.fsutil.locked_run`: a second writer is refused, naming the holder),
reports through events (:mod:`flowplug.hookspecs`; a failing monitor never stops it),
and is resumable where its command is (``resume=True``: the same chain, bit for bit, as
an uninterrupted run). Jobs print nothing; the ones that have something to say along
the way take ``log`` (a callable receiving one line).

============================================  =====================================================
job                                           what it does
============================================  =====================================================
:func:`flowplug.jobs.hmc.run_hmc`             exact HMC ensembles for any registered action
:func:`flowplug.jobs.sample.run_sample`       exact Markov chains from a trained flow
:func:`flowplug.jobs.resample.run_resample`   exact flow chains seeded by an existing ensemble
:func:`flowplug.jobs.train.run_train`         train a flow (:func:`~flowplug.jobs.train.resume_train` continues one)
:func:`flowplug.jobs.demo.run_demo`           HMC, training, resampling and a report against exact values (2D U(1))
:func:`flowplug.jobs.propose.run_propose`     one exact flow step on a production code's configuration file
============================================  =====================================================

The parts they share:

- :mod:`flowplug.jobs.chains`: the one chain driver :func:`~flowplug.jobs.chains.run_chains`
  (thermalisation, checkpoints every N steps, resume, progress bar, events), and the
  kernels and importance weights of flow chains;
- :mod:`flowplug.jobs.output`: the one chain-output component
  :class:`~flowplug.jobs.output.ChainOutput` (configurations, measurements, checkpoint,
  ``provenance.json``, ``summary.json``, report), which rolls its files back to the
  checkpoint when a run resumes;
- :mod:`flowplug.jobs.summary`: the Gamma-method summary of chain histories (with the
  topological susceptibility <Q^2>/V wherever Q is measured, and the warning for chains
  too short for their tau_int);
- :mod:`flowplug.threads`: the ``threads`` key of every job (default 1; 0 = torch's default),
  applied by :func:`~flowplug.threads.job_threads` for the duration of the job;
- :mod:`flowplug.jobs.provenance`: the configuration fingerprint that ties a checkpoint
  to its run, file SHA-256 and the provenance record of each configuration;
- :mod:`flowplug.jobs.report`: PNG reports.

Example::

    from flowplug import config
    from flowplug.jobs.hmc import DEFAULT_CONFIG, run_hmc

    cfg = config.build_config(DEFAULT_CONFIG, overrides=["out='u1-run'", "hmc.trajectories=200"])
    summary = run_hmc(cfg)
    print(summary["observables"]["plaquette"])    # mean, error, tau_int, ...
"""

from __future__ import annotations

from flowplug.jobs.demo import run_demo
from flowplug.jobs.hmc import run_hmc
from flowplug.jobs.propose import run_propose
from flowplug.jobs.resample import run_resample
from flowplug.jobs.sample import run_sample
from flowplug.jobs.train import resume_train, run_train

__all__ = ["run_hmc", "run_sample", "run_resample", "run_train", "resume_train", "run_demo", "run_propose"]
