"""BitMar's data and operations layer, one subpackage per asset group: data/, features/, text/,
training/, evaluation/, release/, and resources/ for Dagster resources; config, storage and the
CLI at the top."""

import os

# OpenMP's default active wait makes every torch parallel region spin until all its threads
# arrive; with one core busy elsewhere (decoding threads, Dagster, another run) a 2-core
# machine then ran small-model steps ~80x slower (measured: 17 s vs 0.97 s per step).
# Must be set before torch loads its OpenMP runtime; an explicit user setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
