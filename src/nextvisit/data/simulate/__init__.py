"""The embedded synthetic health system (docs/simulator.md).

``simulate`` writes a MEDS 0.4 dataset; ``oracle_risk`` / ``oracle_risks`` give the simulator's true risk of a
first diagnosis within a horizon (the ceiling no model can beat); ``nextvisit.baselines.oracle`` scores a labels
folder with it in the predictions schema.
"""

from nextvisit.data.simulate.dataset import SIMULATOR_VERSION, WriteOptions, simulate, simulate_subjects
from nextvisit.data.simulate.engine import SimulationConfig
from nextvisit.data.simulate.oracle import OracleConfig, Simulator, oracle_risk, oracle_risks

__all__ = ["simulate", "simulate_subjects", "SimulationConfig", "WriteOptions", "SIMULATOR_VERSION", "oracle_risk",
           "oracle_risks", "OracleConfig", "Simulator"]
