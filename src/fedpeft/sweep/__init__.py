"""FedHPO: ``fedpeft sweep SPEC.yaml``. A sweep is a base config plus a search space over its keys; each
trial is a normal run directory. ``spec.py`` (the spec and its checks), ``space.py`` (grid and seeded
random points, pure), ``halving.py`` (successive halving, pure), ``runner.py`` (trials in process, the
resumable state file), ``results.py`` (table, rank correlation, plot)."""
