"""The embedded synthetic health system: ``simulate`` writes a MEDS dataset, ``oracle_risk`` gives the true
risk of a first diagnosis that no model can beat (see docs/simulator.md)."""

from nextvisit.simulate.dataset import SIMULATOR_VERSION, WriteOptions, simulate, simulate_subjects
from nextvisit.simulate.engine import SimulationConfig

__all__ = ["simulate", "simulate_subjects", "SimulationConfig", "WriteOptions", "SIMULATOR_VERSION"]
