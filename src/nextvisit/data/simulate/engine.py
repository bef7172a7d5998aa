"""The simulator's core: a vectorized, event-driven model of subjects in care.

A subject's life before entry into care is simulated in yearly steps (conditions may begin, BMI drifts);
from entry on, the model jumps from one event to the next. In each step every active subject draws, from
its own hazards held constant over the step, the day of its next visit (outpatient, emergency or inpatient
clock), of death and of loss to follow-up; conditions begin within the step with their own hazards, and a
condition whose onset brings the subject in (a stroke, a knee injury) cuts the step short with a hospital
visit that day. At the visit, present conditions may be diagnosed, diagnosed ones are coded again, drugs
start and repeat, labs and vitals are measured from the latent state, and prodromes and background
problems are recorded.

Randomness: each subject has its own ``numpy`` generator seeded from ``SeedSequence([seed, subject_id])``
and every step consumes a fixed number of its uniforms, so a subject's record does not depend on which
other subjects share its batch or worker. Re-running one subject reproduces it exactly; this is what the
oracle (``nextvisit.data.simulate.oracle``) relies on.

Hazards are constant within a step (given the state after the last visit), and the waiting times are
geometric in whole days (memoryless), so the state after the last visit on or before a day ``t`` plus the
knowledge "no visit and no death in between" is everything the simulator knows at ``t``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from typing import NamedTuple

import numpy as np
from scipy.special import ndtri

from nextvisit.data.simulate import catalog
from nextvisit.data.simulate.catalog import CONDITIONS, DRUGS, LABS, PROCEDURES
from nextvisit.units import DAYS_PER_YEAR

EPOCH = date(1970, 1, 1)
OUT, ED, IP = 0, 1, 2
NEVER = np.iinfo(np.int64).max // 4  # a day that never comes


def day_of(d: date) -> int:
    """Days since 1970-01-01.

    >>> day_of(date(1970, 1, 2))
    1
    """
    return (d - EPOCH).days


@dataclass(frozen=True)
class SimulationConfig:
    """Numbers of the simulated health system. Every rate is per year unless its name says otherwise."""

    care_start: date = date(2013, 1, 1)  # entries into care spread uniformly over [care_start, entry_end]
    entry_end: date = date(2020, 12, 31)
    data_end: date = date(2023, 12, 31)  # end of follow-up for everyone alive and in care
    # age at entry: (from, to, share); a health system with many older adults
    age_bands: tuple[tuple[float, float, float], ...] = (
        (0, 18, 0.15), (18, 40, 0.18), (40, 60, 0.24), (60, 80, 0.30), (80, 96, 0.13))
    male_share: float = 0.46
    # visits
    outpatient_rate: float = 2.3  # at age 40, no diagnosed conditions
    outpatient_age_slope: float = 0.012  # log rate per year of age
    max_burden_log_hr: float = 1.0  # cap on the sum of the diagnosed conditions' visit effects
    emergency_rate: float = 0.15
    emergency_age_slope: float = 0.01
    inpatient_rate: float = 0.025
    inpatient_age_slope: float = 0.035
    frailty_visit_log_hr: float = 0.3
    prodrome_visit_log_hr: float = 0.3  # prodromal or undiagnosed dementia / knee OA bring subjects in
    # death (Gompertz) and loss to follow-up
    death_rate_at_60: float = 0.007
    death_age_slope: float = 0.085
    death_floor: float = 0.0004
    frailty_death_log_hr: float = 0.35
    loss_rate_young: float = 0.06  # ages 18-40
    loss_rate: float = 0.035
    # latent vulnerabilities known only to the simulator (per standard deviation)
    cognitive_log_hr: float = 0.7  # dementia and MCI
    knee_log_hr: float = 0.6  # knee OA
    # coding
    recode_outpatient: float = 1.0  # multipliers of a condition's p_recur by visit kind
    recode_emergency: float = 0.45
    recode_inpatient: float = 1.1
    intake_recode: float = 0.85  # chance a known condition is coded at the first visit in care
    drug_record_emergency: float = 0.3  # multiplier of p_refill at emergency visits
    drug_stop: float = 0.05  # chance per visit that a running drug is stopped
    later_start_share: float = 0.08  # log-scale share of a drug's start chance at visits after the diagnosis
    # sizes
    max_age_years: int = 96

    @property
    def start_day(self) -> int:
        return day_of(self.care_start)

    @property
    def end_day(self) -> int:
        return day_of(self.data_end)


C = len(CONDITIONS)
D = len(DRUGS)
L = len(LABS)
P = len(PROCEDURES)
Q = len(catalog.PRODROME_CODES)
COND = {c.name: i for i, c in enumerate(CONDITIONS)}
DRUG = {d.name: i for i, d in enumerate(DRUGS)}
LAB = {lab.name: i for i, lab in enumerate(LABS)}
PROC = {p[0]: i for i, p in enumerate(PROCEDURES)}
PRODROME = {p[0]: i for i, p in enumerate(catalog.PRODROME_CODES)}
PANELS = ("vitals", "bmp", "lipids", "hba1c", "cbc", "tsh", "alt", "nt_probnp", "moca")
PANEL_LABS = {
    "vitals": ("sbp", "dbp", "bmi", "weight", "heart_rate"),
    "bmp": ("glucose", "creatinine", "egfr", "potassium", "sodium"),
    "lipids": ("ldl", "hdl", "total_cholesterol"),
    "hba1c": ("hba1c",), "cbc": ("hemoglobin", "wbc"), "tsh": ("tsh",), "alt": ("alt",),
    "nt_probnp": ("nt_probnp",), "moca": ("moca",),
}
ACUTE_SLOTS = 3


class _Layout:
    """Named slices of a fixed-width vector of uniforms."""

    def __init__(self, **sizes: int):
        self.width = 0
        for name, size in sizes.items():
            setattr(self, name, slice(self.width, self.width + size))
            self.width += size


# Uniforms per subject: once at creation, per year of life before entry, at entry, and per step in care.
STATIC = _Layout(sex=1, race=1, ethnicity=1, age_band=1, age=1, entry=1, split=1, normals=12)
NORMALS = ("frailty", "cognitive", "knee", "height", "sbp", "hba1c", "ldl", "hdl", "egfr", "bmi0",
           "bmi_slope", "spare")
YEAR = _Layout(onset=C, bmi=1)
ENTRY = _Layout(known=C, drugs=D, variant=C)
STEP = _Layout(onset=C, detect=C, recode=C, drug_start=D, drug_refill=D, panels=len(PANELS),
               lab_noise=L, procedures=P, acute_present=ACUTE_SLOTS, acute_choice=ACUTE_SLOTS, acute_drug=2,
               prodromes=Q, knee_side=1, on_demand=2, visit=1, death=1, loss=1, kind=1, bmi=1, em=1)


# Futures rolled forward by the oracle need only what decides the first record of the oracle's conditions.
ROLLOUT_TARGETS = ("dementia", "knee_oa")
ROLLOUT = _Layout(onset=C, detect=C, recode=len(ROLLOUT_TARGETS), drug_start=4, drug_refill=4, visit=1, death=1,
                  loss=1, kind=1, bmi=1)


@dataclass
class Tables:
    """The catalog as arrays, and the code index of every emitted code."""

    book: catalog.CodeBook
    log_rate: np.ndarray
    ref_age: np.ndarray
    age_slope: np.ndarray
    min_age: np.ndarray
    male_lhr: np.ndarray
    bmi_lhr: np.ndarray
    frailty_lhr: np.ndarray
    risk: np.ndarray
    prodrome_rate: np.ndarray
    has_prodrome: np.ndarray
    p_detect: np.ndarray  # [C, 3]
    p_recur: np.ndarray
    acute_kind: np.ndarray  # -1 none, else visit kind
    death_lhr: np.ndarray
    visit_lhr: np.ndarray
    p_known: np.ndarray
    variant_cum: np.ndarray  # [C, V] cumulative shares of a condition's codes
    dx_code: np.ndarray  # [C, V] code index
    recur_code: np.ndarray  # [C] code index used after the onset visit
    male_only: np.ndarray
    female_only: np.ndarray
    start_log1m: np.ndarray  # [C, D] log(1 - chance per visit to start drug d once c is diagnosed)
    drug_refill: np.ndarray
    drug_code: np.ndarray
    event_drugs: np.ndarray  # [C, D] bool: drug d counts as a record of condition c
    lab_code: np.ndarray
    lab_panel: np.ndarray  # [L] panel index
    proc_code: np.ndarray
    prodrome_code: np.ndarray
    visit_code: np.ndarray
    acute_out_cum: np.ndarray
    acute_out_code: np.ndarray
    acute_hosp_cum: np.ndarray
    acute_hosp_code: np.ndarray
    on_demand_code: np.ndarray
    acute_drug_code: np.ndarray
    race_cum: np.ndarray
    ethnicity_cum: np.ndarray
    static_codes: dict = field(default_factory=dict)


def build_tables() -> Tables:
    book = catalog.build_codebook()
    max_variants = max(len(c.codes) for c in CONDITIONS)
    variant_cum = np.ones((C, max_variants))
    dx_code = np.zeros((C, max_variants), dtype=np.int32)
    recur_code = np.zeros(C, dtype=np.int32)
    for i, cond in enumerate(CONDITIONS):
        shares = np.array([s for _, _, s in cond.codes])
        variant_cum[i, : len(shares)] = np.cumsum(shares / shares.sum())
        for v in range(max_variants):
            dx_code[i, v] = book[f"ICD10CM//{cond.codes[min(v, len(cond.codes) - 1)][0]}"]
        recur_code[i] = book[f"ICD10CM//{cond.recur_code[0]}"] if cond.recur_code else -1
    start_log1m = np.zeros((C, D))
    event_drugs = np.zeros((C, D), dtype=bool)
    for d, drug in enumerate(DRUGS):
        for name, p in drug.indications:
            start_log1m[COND[name], d] = np.log1p(-p)
    for c, cond in enumerate(CONDITIONS):
        for name in cond.event_drugs:
            event_drugs[c, DRUG[name]] = True
    lab_panel = np.zeros(L, dtype=np.int32)
    for p, panel in enumerate(PANELS):
        for name in PANEL_LABS[panel]:
            lab_panel[LAB[name]] = p

    def cum(items):
        w = np.array([x[-1] for x in items], dtype=float)
        return np.cumsum(w / w.sum())

    arr = lambda f, dtype=float: np.array([f(c) for c in CONDITIONS], dtype=dtype)  # noqa: E731
    return Tables(
        book=book,
        log_rate=arr(lambda c: np.log(c.rate_per_year) if c.rate_per_year > 0 else -np.inf),
        ref_age=arr(lambda c: c.ref_age), age_slope=arr(lambda c: c.age_log_hr_per_decade / 10.0),
        min_age=arr(lambda c: c.min_age), male_lhr=arr(lambda c: c.male_log_hr),
        bmi_lhr=arr(lambda c: c.bmi_log_hr), frailty_lhr=arr(lambda c: c.frailty_log_hr),
        risk=catalog.risk_matrix(),
        prodrome_rate=arr(lambda c: 1.0 / c.prodrome_years if c.prodrome_years > 0 else 0.0),
        has_prodrome=arr(lambda c: c.prodrome_years > 0, bool),
        p_detect=np.array([c.p_detect for c in CONDITIONS]), p_recur=arr(lambda c: c.p_recur),
        acute_kind=arr(lambda c: -1 if c.acute_presentation is None else
                       catalog.VISIT_KINDS.index(c.acute_presentation), np.int64),
        death_lhr=arr(lambda c: c.death_log_hr), visit_lhr=arr(lambda c: c.visit_log_hr),
        p_known=arr(lambda c: c.p_known_at_entry),
        variant_cum=variant_cum, dx_code=dx_code, recur_code=recur_code,
        male_only=arr(lambda c: c.sex_only == "M", bool), female_only=arr(lambda c: c.sex_only == "F", bool),
        start_log1m=start_log1m, drug_refill=np.array([d.p_refill for d in DRUGS]),
        drug_code=np.array([book[f"RXNORM//{d.rxnorm}"] for d in DRUGS], dtype=np.int32),
        event_drugs=event_drugs,
        lab_code=np.array([book[f"LOINC//{lab.loinc}"] for lab in LABS], dtype=np.int32), lab_panel=lab_panel,
        proc_code=np.array([book[f"CPT//{p[1]}"] for p in PROCEDURES], dtype=np.int32),
        prodrome_code=np.array([book[f"ICD10CM//{p[1]}"] for p in catalog.PRODROME_CODES], dtype=np.int32),
        visit_code=np.array([book[f"VISIT//{k}"] for k in catalog.VISIT_KINDS], dtype=np.int32),
        acute_out_cum=cum(catalog.ACUTE_OUTPATIENT),
        acute_out_code=np.array([book[f"ICD10CM//{a[0]}"] for a in catalog.ACUTE_OUTPATIENT], dtype=np.int32),
        acute_hosp_cum=cum(catalog.ACUTE_HOSPITAL),
        acute_hosp_code=np.array([book[f"ICD10CM//{a[0]}"] for a in catalog.ACUTE_HOSPITAL], dtype=np.int32),
        on_demand_code=np.array([book[f"RXNORM//{r}"] for _, r in catalog.ON_DEMAND_DRUGS], dtype=np.int32),
        acute_drug_code=np.array([book[f"RXNORM//{r}"] for _, r in catalog.ACUTE_DRUGS], dtype=np.int32),
        race_cum=cum(catalog.RACES), ethnicity_cum=cum(catalog.ETHNICITIES),
        static_codes={
            "sex": np.array([book[f"GENDER//{s}"] for s, _ in catalog.SEXES], dtype=np.int32),
            "race": np.array([book[f"RACE//{r}"] for r, _, _ in catalog.RACES], dtype=np.int32),
            "ethnicity": np.array([book[f"ETHNICITY//{e}"] for e, _, _ in catalog.ETHNICITIES], dtype=np.int32),
            "birth": book["MEDS_BIRTH"], "death": book["MEDS_DEATH"],
        },
    )


TABLES = build_tables()
ACUTE_COLUMNS = np.nonzero(TABLES.acute_kind >= 0)[0]
for _name in ("age_slope", "ref_age", "bmi_lhr", "risk", "min_age", "prodrome_rate"):
    setattr(TABLES, _name + "32", getattr(TABLES, _name).astype(np.float32))
ROLLOUT_COLUMNS = np.array([COND[name] for name in ROLLOUT_TARGETS])
ROLLOUT_DRUGS = np.nonzero(TABLES.event_drugs[ROLLOUT_COLUMNS].any(axis=0))[0]
assert len(ROLLOUT_DRUGS) == ROLLOUT.drug_start.stop - ROLLOUT.drug_start.start


def _normal(u: np.ndarray) -> np.ndarray:
    return ndtri(np.clip(u, 1e-12, 1 - 1e-12))


def _exponential(u: np.ndarray) -> np.ndarray:
    return -np.log1p(-u)  # u in [0, 1) from Generator.random


def _pick(cum: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Index of a categorical draw with cumulative shares ``cum`` (last = 1)."""
    return np.minimum(np.searchsorted(cum, u, side="right"), len(cum) - 1)


def subject_generator(seed: int, subject_id: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, subject_id])))


# -- state --------------------------------------------------------------------------------------------------

STATE_FIELDS = (
    "subject_id", "birth_day", "male", "race", "ethnicity", "split_u", "frailty", "cognitive", "knee", "height",
    "sbp_z", "hba1c_z", "ldl_z", "hdl_z", "egfr_z", "bmi_slope", "bmi", "day", "stage", "variant", "drug_on",
    "coded", "visits", "offset", "group", "base_log_hazard",
)


@dataclass
class State:
    """Per-row arrays (first axis: rows = subjects, or Monte Carlo replicas of subjects)."""

    subject_id: np.ndarray
    birth_day: np.ndarray
    male: np.ndarray
    race: np.ndarray
    ethnicity: np.ndarray
    split_u: np.ndarray
    frailty: np.ndarray
    cognitive: np.ndarray
    knee: np.ndarray
    height: np.ndarray
    sbp_z: np.ndarray
    hba1c_z: np.ndarray
    ldl_z: np.ndarray
    hdl_z: np.ndarray
    egfr_z: np.ndarray
    bmi_slope: np.ndarray
    bmi: np.ndarray
    day: np.ndarray  # day of the last event (visit or entry - 1)
    stage: np.ndarray  # [R, C] int8
    variant: np.ndarray  # [R, C] int8: which of the condition's codes this subject gets
    drug_on: np.ndarray  # [R, D] bool
    coded: np.ndarray  # [R, C] bool: a code of the condition (or an event drug) has been recorded
    visits: np.ndarray  # visits so far
    offset: np.ndarray  # days the next visit, death and visible onsets are known not to happen in
    group: np.ndarray  # index of the generator the row draws from
    base_log_hazard: np.ndarray  # [R, C] float32: the parts of the onset log hazards that never change

    def __len__(self) -> int:
        return len(self.day)

    def take(self, index) -> "State":
        return State(**{name: getattr(self, name)[index] for name in STATE_FIELDS})

    def copy(self) -> "State":
        return State(**{name: getattr(self, name).copy() for name in STATE_FIELDS})

    @staticmethod
    def concat(states: list["State"]) -> "State":
        return State(**{name: np.concatenate([getattr(s, name) for s in states]) for name in STATE_FIELDS})


def _bmi_drift(age: np.ndarray, slope: np.ndarray) -> np.ndarray:
    """Mean yearly BMI change by age plus the subject's own adult slope."""
    drift = np.select([age < 2, age < 6, age < 18, age < 55, age < 70], [0.0, -0.1, 0.45, 0.14, 0.0], -0.12)
    return drift + np.where((age >= 18) & (age < 60), slope, 0.0)


def _base_log_hazard(st: State, cfg: SimulationConfig) -> np.ndarray:
    """[R, C] the time-invariant part of each onset log hazard (sex, frailty, latent vulnerabilities)."""
    T = TABLES
    log_hazard = T.log_rate + st.male[:, None] * T.male_lhr + T.frailty_lhr * st.frailty[:, None]
    log_hazard[:, COND["dementia"]] += cfg.cognitive_log_hr * st.cognitive
    log_hazard[:, COND["mci"]] += cfg.cognitive_log_hr * st.cognitive
    log_hazard[:, COND["knee_oa"]] += cfg.knee_log_hr * st.knee
    log_hazard[(T.male_only & ~st.male[:, None]) | (T.female_only & st.male[:, None])] = -np.inf
    return log_hazard.astype(np.float32)


def _onset_rates(st: State, age: np.ndarray, cfg: SimulationConfig) -> np.ndarray:
    """[R, C] per-year rate of the next stage transition of each condition (0 where none is possible)."""
    T = TABLES
    present = (st.stage >= 1).astype(np.float32)
    age32 = age.astype(np.float32)[:, None]
    log_hazard = (st.base_log_hazard + T.age_slope32 * (age32 - T.ref_age32)
                  + T.bmi_lhr32 * np.maximum(st.bmi.astype(np.float32)[:, None] - 25.0, -5.0) + present @ T.risk32)
    rate = np.exp(log_hazard)
    rate[age32 < T.min_age32] = 0.0
    return np.where(st.stage == 0, rate, np.where(st.stage == 1, T.prodrome_rate32, np.float32(0.0)))


# -- creating subjects and their life before care ------------------------------------------------------------

def new_subjects(subject_ids: np.ndarray, seed: int, cfg: SimulationConfig):
    """Subjects at entry into care (state with ``day`` = entry day - 1) and their generators."""
    T = TABLES
    n = len(subject_ids)
    gens = [subject_generator(seed, int(s)) for s in subject_ids]
    static = np.stack([g.random(STATIC.width) for g in gens]) if n else np.zeros((0, STATIC.width))
    normals = dict(zip(NORMALS, _normal(static[:, STATIC.normals]).T))
    bands = np.array(cfg.age_bands, dtype=float)
    band = _pick(np.cumsum(bands[:, 2] / bands[:, 2].sum()), static[:, STATIC.age_band][:, 0])
    age_entry = bands[band, 0] + static[:, STATIC.age][:, 0] * (bands[band, 1] - bands[band, 0])
    entry_day = cfg.start_day + np.floor(static[:, STATIC.entry][:, 0]
                                         * (day_of(cfg.entry_end) - cfg.start_day + 1)).astype(np.int64)
    birth_day = entry_day - np.round(age_entry * DAYS_PER_YEAR).astype(np.int64)
    male = static[:, STATIC.sex][:, 0] < cfg.male_share
    st = State(
        subject_id=np.asarray(subject_ids, dtype=np.int64), birth_day=birth_day, male=male,
        race=_pick(T.race_cum, static[:, STATIC.race][:, 0]),
        ethnicity=_pick(T.ethnicity_cum, static[:, STATIC.ethnicity][:, 0]),
        split_u=static[:, STATIC.split][:, 0], frailty=normals["frailty"], cognitive=normals["cognitive"],
        knee=normals["knee"], height=np.where(male, 1.76, 1.62) + 0.07 * normals["height"],
        sbp_z=normals["sbp"], hba1c_z=normals["hba1c"], ldl_z=normals["ldl"], hdl_z=normals["hdl"],
        egfr_z=normals["egfr"], bmi_slope=0.12 * normals["bmi_slope"], bmi=16.5 + 1.2 * normals["bmi0"],
        day=birth_day.copy(), stage=np.zeros((n, C), np.int8), variant=np.zeros((n, C), np.int8),
        drug_on=np.zeros((n, D), bool), coded=np.zeros((n, C), bool), visits=np.zeros(n, np.int64),
        offset=np.zeros(n, np.int64), group=np.arange(n, dtype=np.int64), base_log_hazard=np.zeros((n, C), np.float32),
    )
    st.base_log_hazard = _base_log_hazard(st, cfg)
    # Life before care, one year at a time (the step hazards evaluated at the start of each year).
    years = np.stack([g.random((cfg.max_age_years, YEAR.width)) for g in gens]) if n else np.zeros(
        (0, cfg.max_age_years, YEAR.width))
    whole_years = np.floor(age_entry).astype(np.int64)
    for year in range(int(whole_years.max(initial=0))):
        rows = whole_years > year
        if not rows.any():
            break
        sub = st.take(rows)
        age = np.full(len(sub), year + 0.5)
        rate = _onset_rates(sub, age, cfg)
        onset = years[rows, year, YEAR.onset] < -np.expm1(-rate)
        sub.stage = np.where(onset, np.where((sub.stage == 0) & TABLES.has_prodrome, 1, 2), sub.stage).astype(np.int8)
        sub.bmi = np.maximum(sub.bmi + _bmi_drift(age, sub.bmi_slope) + 0.35 * _normal(years[rows, year, YEAR.bmi][:, 0]),
                             13.0)
        sub.stage[:, COND["obesity"]] = np.where((sub.stage[:, COND["obesity"]] == 0) & (sub.bmi >= 30), 2,
                                                 sub.stage[:, COND["obesity"]])
        st.stage[rows], st.bmi[rows] = sub.stage, sub.bmi
    # Entry: conditions present before care are mostly known already (diagnosed elsewhere), with their drugs.
    entry = np.stack([g.random(ENTRY.width) for g in gens]) if n else np.zeros((0, ENTRY.width))
    known = (st.stage == 2) & (entry[:, ENTRY.known] < T.p_known)
    st.stage[known] = 3
    st.variant = _variants(entry[:, ENTRY.variant])
    diagnosed = (st.stage == 3).astype(np.float64)
    p_on = 1.0 - np.exp(diagnosed @ T.start_log1m)
    st.drug_on = entry[:, ENTRY.drugs] < p_on
    st.day = entry_day - 1
    st.offset = np.full(n, -1, np.int64)  # marks "first visit is on entry day"
    return st, gens


def _variants(u: np.ndarray) -> np.ndarray:
    return (u[:, :, None] > TABLES.variant_cum[None, :, :-1]).sum(-1).astype(np.int8)


# -- one step in care ----------------------------------------------------------------------------------------

@dataclass
class StepResult:
    kind: np.ndarray  # visit kind per row, -1: no visit (the row ends)
    new_day: np.ndarray  # day of the visit, death or exit
    died: np.ndarray
    ended: np.ndarray  # the row leaves (death, loss to follow-up, end of data)
    newly_coded: np.ndarray  # [R, C]
    rows: list  # emissions: row index, code index, value (NaN for none)
    codes: list
    values: list


class _Hazards(NamedTuple):
    """Visit rates per year by kind and the death rate per day, each row's own, constant over the step."""

    outpatient: np.ndarray
    emergency: np.ndarray
    inpatient: np.ndarray
    death_per_day: np.ndarray


class _NextEvent(NamedTuple):
    """Each row's next event; gaps are days after ``st.day``."""

    onset_time: np.ndarray  # [R, C] days to each condition's next stage (inf when impossible)
    acute_gap: np.ndarray  # [R, A] day of each onset of ACUTE_COLUMNS that would bring the subject in, or inf
    triggered: np.ndarray  # the visit is the one an acute onset brings
    visit_at: np.ndarray
    died: np.ndarray
    ended: np.ndarray
    new_day: np.ndarray


class _VisitRows(NamedTuple):
    """The rows with a visit in this step, at the visit day, before anything is diagnosed."""

    v: np.ndarray  # row indices
    U: np.ndarray  # their uniforms
    intake: np.ndarray  # the first visit in care
    kind: np.ndarray
    age: np.ndarray  # years
    stage: np.ndarray  # [V, C] after the onsets up to the visit day
    bmi: np.ndarray
    brought_in: np.ndarray  # [V, A] the onset of ACUTE_COLUMNS that brought the subject in


class _Care(NamedTuple):
    """What the visit found and prescribed."""

    newly: np.ndarray  # [V, C] diagnosed at this visit
    cond_emit: np.ndarray  # [V, C] a code of the condition is recorded
    drugs: np.ndarray | slice  # the drug columns decided (all, or ROLLOUT_DRUGS)
    drug_on: np.ndarray  # [V, len(drugs)] after the visit
    drug_emit: np.ndarray  # [V, len(drugs)] the drug is recorded
    coded_now: np.ndarray  # [V, C] the condition (or one of its event drugs) is recorded


def step(st: State, U: np.ndarray, cfg: SimulationConfig, *, rollout: bool = False, emit: bool = True) -> StepResult:
    """Advance every row to its next event (in place) and return what was recorded.

    ``U``: [R, STEP.width] uniforms (``ROLLOUT.width`` when ``rollout``). ``rollout``: a Monte Carlo future
    for the oracle: no loss to follow-up and no end of data (the oracle's risk is the subject's, not the
    data's), only the records of ``ROLLOUT_TARGETS`` are decided, and nothing is emitted.
    ``st.offset`` days after ``st.day`` are known to hold no visit and no death.
    """
    lay = ROLLOUT if rollout else STEP
    emit = emit and not rollout
    R = len(st)
    first = st.offset < 0
    age = (st.day - st.birth_day) / DAYS_PER_YEAR
    hazards = _hazards(st, age, cfg)
    nxt = _next_event(st, U, lay, cfg, age, hazards, rollout)
    rows_out, codes_out, values_out = [], [], []
    if nxt.died.any() and emit:
        idx = np.nonzero(nxt.died)[0]
        rows_out.append(idx), codes_out.append(np.full(len(idx), TABLES.static_codes["death"], np.int32))
        values_out.append(np.full(len(idx), np.nan, np.float32))
    newly_coded = np.zeros((R, C), bool)
    visit = ~nxt.ended
    if not visit.any():
        st.day = nxt.new_day
        return StepResult(np.full(R, -1), nxt.new_day, nxt.died, nxt.ended, newly_coded, rows_out, codes_out,
                          values_out)

    # From here on only the rows with a visit change.
    rows = _at_visit(st, np.nonzero(visit)[0], U, lay, nxt, hazards, first)
    v = rows.v
    care = _diagnose_and_treat(st, rows, lay, cfg, rollout)
    newly_coded[v] = care.coded_now & ~st.coded[v]

    # write back
    st.stage[v] = rows.stage
    st.bmi[v] = rows.bmi
    if rollout:
        on_all = st.drug_on[v]
        on_all[:, care.drugs] = care.drug_on
        st.drug_on[v] = on_all
    else:
        st.drug_on[v] = care.drug_on
    st.coded[v] |= care.coded_now
    st.visits[v] += 1
    st.offset[:] = 0
    st.day = nxt.new_day

    if emit:
        _emit_visit(_visit_context(st, rows, care), _Recorder(v, rows_out, codes_out, values_out))
    return StepResult(_kinds(R, v, rows.kind), nxt.new_day, nxt.died, nxt.ended, newly_coded, rows_out, codes_out,
                      values_out)


def _hazards(st: State, age: np.ndarray, cfg: SimulationConfig) -> _Hazards:
    T = TABLES
    diagnosed = st.stage == 3
    burden = np.minimum(diagnosed.astype(np.float64) @ T.visit_lhr, cfg.max_burden_log_hr)
    hidden = ((st.stage[:, COND["dementia"]] == 1) | (st.stage[:, COND["dementia"]] == 2)
              | (st.stage[:, COND["knee_oa"]] == 1) | (st.stage[:, COND["knee_oa"]] == 2))
    out_rate = cfg.outpatient_rate * np.exp(cfg.outpatient_age_slope * (age - 40) + burden
                                            + cfg.frailty_visit_log_hr * st.frailty
                                            + cfg.prodrome_visit_log_hr * hidden)
    ed_rate = cfg.emergency_rate * np.exp(cfg.emergency_age_slope * (age - 40) + cfg.frailty_visit_log_hr * st.frailty
                                          + 0.5 * burden)
    ip_rate = cfg.inpatient_rate * np.exp(cfg.inpatient_age_slope * (age - 40) + cfg.frailty_visit_log_hr * st.frailty
                                          + burden)
    present = st.stage >= 2
    death_rate = np.maximum(cfg.death_rate_at_60 * np.exp(cfg.death_age_slope * (age - 60)), cfg.death_floor) * np.exp(
        present.astype(np.float64) @ T.death_lhr + cfg.frailty_death_log_hr * st.frailty) / DAYS_PER_YEAR
    return _Hazards(out_rate, ed_rate, ip_rate, death_rate)


def _wait(u: np.ndarray, rate_per_day: np.ndarray) -> np.ndarray:
    """Whole days to a geometric event, at least one (a day with rate 0 never comes)."""
    with np.errstate(divide="ignore"):
        return np.floor(np.minimum(_exponential(u) / rate_per_day, 1e12)).astype(np.int64) + 1


def _next_event(st: State, U: np.ndarray, lay: _Layout, cfg: SimulationConfig, age: np.ndarray,
                hazards: _Hazards, rollout: bool) -> _NextEvent:
    R = len(st)
    first = st.offset < 0
    offset = np.maximum(st.offset, 0)
    rate = _onset_rates(st, age, cfg) / DAYS_PER_YEAR  # [R, C] per day
    rate[first] = 0.0
    visit_rate = (hazards.outpatient + hazards.emergency + hazards.inpatient) / DAYS_PER_YEAR
    visit_gap = np.where(first, 1, _wait(U[:, lay.visit][:, 0], visit_rate) + offset)
    death_gap = np.where(first, NEVER, _wait(U[:, lay.death][:, 0], hazards.death_per_day) + offset)
    if rollout:
        loss_gap = np.full(R, NEVER)
        admin_gap = np.full(R, NEVER)
    else:
        loss_rate = np.where((age >= 18) & (age < 40), cfg.loss_rate_young, cfg.loss_rate) / DAYS_PER_YEAR
        loss_gap = np.where(first, NEVER, _wait(U[:, lay.loss][:, 0], loss_rate))
        admin_gap = cfg.end_day - st.day
    with np.errstate(divide="ignore"):
        onset_time = _exponential(U[:, lay.onset]) / rate  # [R, C] days (inf when impossible)
    acute_onset = onset_time[:, ACUTE_COLUMNS]
    acute_gap = np.where(np.isfinite(acute_onset), np.floor(np.minimum(acute_onset, 1e12)) + 1 + offset[:, None],
                         np.inf)
    acute_first = acute_gap.min(axis=1)
    triggered = acute_first < visit_gap
    visit_at = np.where(triggered, acute_first, visit_gap).astype(np.int64)
    died = (death_gap <= visit_at) & (death_gap <= loss_gap) & (death_gap <= admin_gap)
    ended = died | (loss_gap < visit_at) | (admin_gap < visit_at)
    visit = ~ended
    new_day = st.day + np.where(died, death_gap, np.where(visit, visit_at, np.minimum(loss_gap, admin_gap)))
    return _NextEvent(onset_time, acute_gap, triggered, visit_at, died, ended, new_day)


def _at_visit(st: State, v: np.ndarray, U: np.ndarray, lay: _Layout, nxt: _NextEvent, hazards: _Hazards,
              first: np.ndarray) -> _VisitRows:
    """Onsets and BMI drift up to the visit day, and the kind of visit."""
    T = TABLES
    Uv = U[v]
    gap_days = (nxt.visit_at[v]).astype(np.float64)
    age_v = (nxt.new_day[v] - st.birth_day[v]) / DAYS_PER_YEAR
    stage = st.stage[v]
    onset = nxt.onset_time[v] < gap_days[:, None]
    onset[:, ACUTE_COLUMNS] = nxt.acute_gap[v] <= gap_days[:, None]
    stage = np.where(onset, np.where((stage == 0) & T.has_prodrome, 1, 2), stage).astype(np.int8)
    dt = gap_days / DAYS_PER_YEAR
    bmi = np.maximum(st.bmi[v] + _bmi_drift(age_v, st.bmi_slope[v]) * dt
                     + 0.35 * np.sqrt(dt) * _normal(Uv[:, lay.bmi][:, 0]), 13.0)
    ob = COND["obesity"]
    stage[:, ob] = np.where((stage[:, ob] == 0) & (bmi >= 30), 2, stage[:, ob])

    lam = np.stack([hazards.outpatient[v], hazards.emergency[v], hazards.inpatient[v]], axis=1)
    cum = np.cumsum(lam, axis=1) / lam.sum(axis=1, keepdims=True)
    kind = (Uv[:, lay.kind] > cum[:, :2]).sum(axis=1)
    trig = nxt.triggered[v]
    if trig.any():
        trig_cond = ACUTE_COLUMNS[np.argmin(nxt.acute_gap[v], axis=1)]
        kind = np.where(trig, T.acute_kind[trig_cond], kind)
    intake = first[v]
    kind = np.where(intake, OUT, kind)
    brought_in = (nxt.acute_gap[v] == gap_days[:, None]) & trig[:, None]
    return _VisitRows(v, Uv, intake, kind, age_v, stage, bmi, brought_in)


def _diagnose_and_treat(st: State, rows: _VisitRows, lay: _Layout, cfg: SimulationConfig, rollout: bool) -> _Care:
    """Diagnoses, codes of diagnosed conditions, and drugs at the visits of ``rows`` (``rows.stage`` in place)."""
    T = TABLES
    Uv, kind, intake, stage = rows.U, rows.kind, rows.intake, rows.stage
    # Diagnosis: present conditions are found at a visit with a chance by visit kind; an onset that
    # brought the subject in is always found.
    p_detect = T.p_detect[:, kind].T  # [V, C]
    newly = (stage == 2) & (Uv[:, lay.detect] < p_detect)
    if rows.brought_in.any():
        newly[:, ACUTE_COLUMNS] |= (stage[:, ACUTE_COLUMNS] == 2) & rows.brought_in
    stage[newly] = 3
    diag = stage == 3
    recode_mult = np.array([cfg.recode_outpatient, cfg.recode_emergency, cfg.recode_inpatient])[kind]
    recur = T.p_recur[ROLLOUT_COLUMNS] if rollout else T.p_recur
    p_recode = np.minimum(recur * recode_mult[:, None], 0.97)
    p_recode = np.where(intake[:, None], np.maximum(p_recode, cfg.intake_recode), p_recode)
    # Drugs start once an indication is diagnosed (most at the diagnosis visit), repeat, and sometimes stop.
    later = (diag & ~newly).astype(np.float64) * cfg.later_start_share
    start_weight = newly.astype(np.float64) + later
    refill_mult = np.where(kind == ED, cfg.drug_record_emergency, 1.0)
    if rollout:
        targets = ROLLOUT_COLUMNS
        drugs = ROLLOUT_DRUGS
        cond_emit = np.zeros((len(rows.v), C), bool)
        cond_emit[:, targets] = newly[:, targets] | (diag[:, targets] & (Uv[:, lay.recode] < p_recode))
    else:
        drugs = slice(None)
        cond_emit = newly | (diag & (Uv[:, lay.recode] < p_recode))
    u_start, u_refill = Uv[:, lay.drug_start], Uv[:, lay.drug_refill]
    p_start = 1.0 - np.exp(start_weight @ T.start_log1m[:, drugs])
    on_before = st.drug_on[rows.v][:, drugs]
    start = ~on_before & (u_start < p_start)
    stopped = on_before & (u_refill > 1.0 - cfg.drug_stop)
    drug_on = (on_before & ~stopped) | start
    drug_emit = start | (on_before & ~stopped & (u_refill < T.drug_refill[drugs] * refill_mult[:, None]))
    coded_now = cond_emit | (drug_emit.astype(np.float64) @ T.event_drugs[:, drugs].T.astype(np.float64) > 0)
    return _Care(newly, cond_emit, drugs, drug_on, drug_emit, coded_now)


def _kinds(R: int, v: np.ndarray, kind: np.ndarray) -> np.ndarray:
    out = np.full(R, -1)
    out[v] = kind
    return out


# -- what a visit records ------------------------------------------------------------------------------------

class _Visit(NamedTuple):
    """The visits of rows ``v`` after the step's write-back: everything the emitters read."""

    v: np.ndarray
    U: np.ndarray  # [V, STEP.width]
    kind: np.ndarray
    age: np.ndarray
    stage: np.ndarray  # [V, C]
    newly: np.ndarray  # [V, C] diagnosed at this visit
    cond_emit: np.ndarray  # [V, C]
    cond_code: np.ndarray  # [V, C] the code each condition is recorded with
    drug_emit: np.ndarray  # [V, D]
    drug_on: np.ndarray  # [V, D] after the visit
    bmi: np.ndarray
    male: np.ndarray
    height: np.ndarray  # adult height, metres
    latent: dict  # name of a State z-score field -> its values at these rows

    def has(self, name: str) -> np.ndarray:
        """Present (diagnosed or not): what the latent state, and so the lab values, follow."""
        return self.stage[:, COND[name]] >= 2

    def diagnosed(self, name: str) -> np.ndarray:
        return self.stage[:, COND[name]] >= 3

    def any_diagnosed(self, *names: str) -> np.ndarray:
        return np.any([self.diagnosed(n) for n in names], axis=0)

    def new(self, name: str) -> np.ndarray:
        return self.newly[:, COND[name]]

    def on(self, *names: str) -> np.ndarray:
        return np.any([self.drug_on[:, DRUG[n]] for n in names], axis=0)


_LATENT_FIELDS = ("sbp_z", "hba1c_z", "ldl_z", "hdl_z", "egfr_z")


def _visit_context(st: State, rows: _VisitRows, care: _Care) -> _Visit:
    T = TABLES
    v = rows.v
    cond_code = np.take_along_axis(T.dx_code, st.variant[v].T.astype(np.int64), axis=1).T  # [V, C]
    cond_code = np.where((T.recur_code >= 0) & ~care.newly, T.recur_code, cond_code)
    return _Visit(v, rows.U, rows.kind, rows.age, rows.stage, care.newly, care.cond_emit, cond_code, care.drug_emit,
                 st.drug_on[v], rows.bmi, st.male[v], st.height[v],
                 {name: getattr(st, name)[v] for name in _LATENT_FIELDS})


class _Recorder:
    """Appends codes recorded at the visits of rows ``v`` to a step's emission lists."""

    def __init__(self, v: np.ndarray, rows: list, codes: list, values: list):
        self.v, self.rows, self.codes, self.values = v, rows, codes, values

    def add(self, mask: np.ndarray, code, value: np.ndarray | None = None) -> None:
        """``mask``: [V] or [V, K] bool; ``code`` (and ``value``): a scalar, [V], [K] or [V, K] to pick from."""
        if mask.ndim == 2:
            r, c = np.nonzero(mask)
        else:
            r, c = np.nonzero(mask)[0], None
        if len(r) == 0:
            return
        self.rows.append(self.v[r])
        if c is not None:
            picked = code[r, c] if np.ndim(code) == 2 else code[c]
        else:
            picked = code[r] if np.ndim(code) else np.full(len(r), code)
        self.codes.append(picked.astype(np.int32))
        if value is None:
            self.values.append(np.full(len(r), np.float32(np.nan), np.float32))
        else:
            self.values.append((value[r, c] if c is not None else value[r]).astype(np.float32))


def _emit_visit(x: _Visit, rec: _Recorder) -> None:
    """Append the codes recorded at the visits; the order of the calls is the order of same-day rows."""
    T = TABLES
    everyone = np.ones(len(x.v), bool)
    rec.add(everyone, T.visit_code[x.kind])
    rec.add(everyone, T.proc_code[_management_procedure(x)])
    rec.add(x.cond_emit, x.cond_code)
    rec.add(x.drug_emit, T.drug_code)
    symptom, knee_pain = _symptoms(x)  # first: MoCA and imaging depend on them
    rec.add(symptom, T.prodrome_code)
    _emit_on_demand_drugs(x, knee_pain, rec)
    drawn = _emit_labs(x, symptom, rec)
    rec.add(x.U[:, STEP.procedures] < _procedure_chances(x, drawn, symptom), T.proc_code)
    _emit_background(x, rec)


def _management_procedure(x: _Visit) -> np.ndarray:
    """The evaluation and management code of each visit (an index into PROCEDURES)."""
    kind, age = x.kind, x.age
    u_em = x.U[:, STEP.em][:, 0]
    preventive = (kind == OUT) & (u_em < 0.1) & (age >= 40)
    return np.where(kind == ED, PROC["ed_visit"], np.where(kind == IP, PROC["inpatient_admission"], np.where(
        preventive, np.where(age >= 65, PROC["preventive_senior"], PROC["preventive_adult"]),
        np.where(u_em < 0.62, PROC["office_visit_low"], PROC["office_visit_moderate"]))))


def _lab_values(x: _Visit) -> tuple[np.ndarray, dict]:
    """[V, L] every lab's value from the latent state, and each lab's standard normal noise by name."""
    age, bmi, kind, male, has, on, zs = x.age, x.bmi, x.kind, x.male, x.has, x.on, x.latent
    noise = _normal(x.U[:, STEP.lab_noise])
    z = {lab.name: noise[:, i] for i, lab in enumerate(LABS)}
    adult = np.clip((age - 2) / 16, 0.35, 1.0)
    height = x.height * np.clip(0.45 + 0.55 * age / 18, 0.45, 1.0)
    antihypertensive = on("lisinopril", "amlodipine", "hydrochlorothiazide", "losartan", "metoprolol", "carvedilol")
    sbp = (108 + 0.45 * np.maximum(age - 20, 0) * adult + 0.6 * (bmi - 25) + 7 * zs["sbp_z"] + 16 * has("hypertension")
           - 11 * antihypertensive) * np.where(age < 12, 0.85, 1.0) + 9 * z["sbp"]
    dbp = 0.55 * sbp + 8 + 6 * z["dbp"]
    hba1c = (5.3 + 0.03 * (bmi - 25) + 0.006 * age + 0.25 * zs["hba1c_z"] + 2.0 * has("type2_diabetes")
             - 0.7 * on("metformin") - 0.5 * on("insulin_glargine", "glipizide", "empagliflozin") + 0.2 * z["hba1c"])
    hba1c = np.maximum(hba1c, 4.0)
    glucose = np.maximum(28.7 * hba1c - 46.7 + 14 * z["glucose"], 50)
    ldl = np.maximum(112 + 28 * zs["ldl_z"] + 35 * has("hyperlipidemia") - 45 * on("atorvastatin", "simvastatin")
                     + 10 * z["ldl"], 30)
    hdl = np.maximum(50 + 10 * (~male) + 11 * zs["hdl_z"] - 0.3 * (bmi - 25) + 4 * z["hdl"], 20)
    egfr = np.clip(110 - 0.8 * np.maximum(age - 20, 0) + 10 * zs["egfr_z"] - 28 * has("ckd") - 6 * has("type2_diabetes")
                   - 4 * has("hypertension") + 5 * z["egfr"], 5, 150)
    creatinine = np.where(male, 1.0, 0.8) * (np.maximum(egfr, 5) / 90.0) ** -1.1 * np.exp(0.04 * z["creatinine"])
    values = np.zeros((len(x.v), L))
    values[:, LAB["sbp"]] = sbp
    values[:, LAB["dbp"]] = dbp
    values[:, LAB["bmi"]] = bmi + 0.3 * z["bmi"]
    values[:, LAB["weight"]] = bmi * height ** 2 + 0.8 * z["weight"]
    values[:, LAB["heart_rate"]] = 74 + 10 * has("atrial_fibrillation") - 6 * on("metoprolol", "carvedilol") + 9 * z["heart_rate"]
    values[:, LAB["glucose"]] = glucose
    values[:, LAB["creatinine"]] = creatinine
    values[:, LAB["egfr"]] = egfr
    values[:, LAB["potassium"]] = 4.2 + 0.3 * has("ckd") + 0.35 * z["potassium"]
    values[:, LAB["sodium"]] = 139 + 2.5 * z["sodium"]
    values[:, LAB["ldl"]] = ldl
    values[:, LAB["hdl"]] = hdl
    values[:, LAB["total_cholesterol"]] = ldl + hdl + 28 + 6 * z["total_cholesterol"]
    values[:, LAB["hba1c"]] = hba1c
    values[:, LAB["hemoglobin"]] = np.where(male, 14.8, 13.3) - 2.3 * has("anemia") - 1.0 * has("ckd") + 0.9 * z["hemoglobin"]
    values[:, LAB["wbc"]] = np.exp(np.log(7.0) + 0.25 * z["wbc"] + 0.25 * (kind != OUT))
    values[:, LAB["tsh"]] = np.exp(np.log(2.0) + 1.4 * (has("hypothyroidism") & ~on("levothyroxine")) + 0.4 * z["tsh"])
    values[:, LAB["alt"]] = np.exp(np.log(24) + 0.01 * (bmi - 25) * 3 + 0.35 * z["alt"])
    values[:, LAB["nt_probnp"]] = np.exp(np.log(60) + age / 40 + 2.4 * has("heart_failure") + 0.6 * z["nt_probnp"])
    dementia = x.stage[:, COND["dementia"]]
    values[:, LAB["moca"]] = np.clip(np.round(27.5 - 0.04 * np.maximum(age - 60, 0) - 4 * has("mci")
                                              - 2.5 * (dementia == 1) - 7 * (dementia >= 2) + 1.6 * z["moca"]), 0, 30)
    return values, z


def _symptoms(x: _Visit) -> tuple[np.ndarray, np.ndarray]:
    """[V, Q] the prodromes and symptoms recorded, and knee pain on either side."""
    age, bmi, has, dxn = x.age, x.bmi, x.has, x.diagnosed
    hosp = x.kind != OUT
    prodromes = x.U[:, STEP.prodromes]
    dementia = x.stage[:, COND["dementia"]]
    knee = x.stage[:, COND["knee_oa"]]
    old = np.maximum(age - 65, 0)
    p_memory = (np.minimum(0.002 * np.exp(0.06 * (age - 65)), 0.04) + 0.16 * (dementia == 1) + 0.3 * (dementia == 2)
                + 0.1 * (dementia == 3) + 0.12 * dxn("mci"))
    p_decline = 0.001 * (age > 65) + 0.05 * (dementia == 1) + 0.1 * (dementia == 2)
    p_falls = (np.minimum(0.003 * np.exp(0.05 * (age - 65)), 0.05) + 0.04 * (dementia >= 1) + 0.08 * has("parkinsons"))
    p_fall = np.where(hosp, 0.05 + 0.006 * old + 0.1 * (dementia >= 1), 0.008 + 0.03 * (dementia >= 1))
    p_knee_pain = (0.01 + 0.004 * np.maximum(bmi - 25, 0) + 0.03 * dxn("knee_injury") + 0.28 * (knee == 1)
                   + 0.4 * (knee == 2) + 0.3 * (knee == 3))
    p_walk = (0.003 + 0.005 * (age > 75) + 0.05 * (knee == 2) + 0.03 * (dementia >= 2) + 0.05 * has("parkinsons"))
    symptom = np.zeros((len(x.v), Q), bool)
    symptom[:, PRODROME["memory_complaint"]] = prodromes[:, PRODROME["memory_complaint"]] < p_memory
    symptom[:, PRODROME["cognitive_decline"]] = prodromes[:, PRODROME["cognitive_decline"]] < p_decline
    symptom[:, PRODROME["repeated_falls"]] = prodromes[:, PRODROME["repeated_falls"]] < p_falls
    symptom[:, PRODROME["fall"]] = prodromes[:, PRODROME["fall"]] < p_fall
    knee_pain = prodromes[:, PRODROME["knee_pain_right"]] < p_knee_pain
    right = x.U[:, STEP.knee_side][:, 0] < 0.5
    symptom[:, PRODROME["knee_pain_right"]] = knee_pain & right
    symptom[:, PRODROME["knee_pain_left"]] = knee_pain & ~right
    symptom[:, PRODROME["difficulty_walking"]] = prodromes[:, PRODROME["difficulty_walking"]] < p_walk
    return symptom, knee_pain


def _emit_on_demand_drugs(x: _Visit, knee_pain: np.ndarray, rec: _Recorder) -> None:
    """Pain relief for knee pain or recorded low back pain."""
    pain = knee_pain | (x.diagnosed("low_back_pain") & x.cond_emit[:, COND["low_back_pain"]])
    on_demand = pain & (x.U[:, STEP.on_demand][:, 0] < 0.3)
    rec.add(on_demand, TABLES.on_demand_code[(x.U[:, STEP.on_demand][:, 1] < 0.5).astype(np.int64)])


def _emit_labs(x: _Visit, symptom: np.ndarray, rec: _Recorder) -> np.ndarray:
    """Record the labs of the panels drawn; returns [V, len(PANELS)] which panels were drawn."""
    T = TABLES
    age, bmi, kind, dxn, any_dx = x.age, x.bmi, x.kind, x.diagnosed, x.any_diagnosed
    out = kind == OUT
    panel_p = np.zeros((len(x.v), len(PANELS)))
    panel_p[:, 0] = np.where(out, 0.5, 0.9)
    panel_p[:, 1] = np.where(out, 0.08 + 0.15 * any_dx("hypertension", "type2_diabetes", "ckd", "heart_failure"),
                             np.where(kind == ED, 0.6, 0.95))
    panel_p[:, 2] = np.where(out, 0.04 * (age >= 20) + 0.12 * any_dx("hyperlipidemia", "coronary_artery_disease",
                                                                      "type2_diabetes"), 0.05)
    panel_p[:, 3] = np.where(out, 0.03 * (age >= 30) + 0.4 * dxn("type2_diabetes") + 0.05 * (bmi >= 30),
                             0.15 * dxn("type2_diabetes"))
    panel_p[:, 4] = np.where(out, 0.06 + 0.15 * any_dx("anemia", "ckd"), np.where(kind == ED, 0.6, 0.9))
    panel_p[:, 5] = np.where(out, 0.03 + 0.35 * dxn("hypothyroidism"), 0.05)
    panel_p[:, 6] = np.where(out, 0.04, 0.4)
    panel_p[:, 7] = np.where(out, 0.25 * dxn("heart_failure"), 0.15 + 0.5 * dxn("heart_failure"))
    panel_p[:, 8] = np.where(out, 0.25 * any_dx("mci", "dementia") + 0.15 * symptom[:, PRODROME["memory_complaint"]], 0.0)
    drawn = x.U[:, STEP.panels] < panel_p
    values, z = _lab_values(x)
    lab_mask = drawn[:, T.lab_panel]
    # heart rate and weight are taken at about half of the vital-sign sets
    lab_mask[:, LAB["heart_rate"]] &= z["dbp"] > 0
    lab_mask[:, LAB["weight"]] &= z["sbp"] < 0
    rec.add(lab_mask, T.lab_code, values)
    return drawn


def _procedure_chances(x: _Visit, drawn: np.ndarray, symptom: np.ndarray) -> np.ndarray:
    """[V, P] the chance of each procedure at each visit."""
    age, kind, male, dxn, new = x.age, x.kind, x.male, x.diagnosed, x.new
    out = kind == OUT
    hosp = ~out
    knee = x.stage[:, COND["knee_oa"]]
    dementia = x.stage[:, COND["dementia"]]
    pp = np.zeros((len(x.v), P))
    blood = drawn[:, 1:8].any(axis=1)
    pp[:, PROC["venipuncture"]] = np.where(out & blood, 0.5, 0.0)
    pp[:, PROC["ecg"]] = np.where(out, 0.03 + 0.4 * new("atrial_fibrillation") + 0.1 * dxn("atrial_fibrillation"),
                                  np.where(kind == ED, 0.45, 0.7))
    pp[:, PROC["flu_vaccine"]] = np.where(out, 0.12, 0.0)
    pp[:, PROC["knee_xray"]] = (0.003 + 0.12 * (knee == 1) + 0.25 * (knee == 2) + 0.03 * (knee == 3) + 0.5 * new("knee_oa")
                                + 0.6 * new("knee_injury"))
    pp[:, PROC["knee_mri"]] = 0.4 * new("knee_injury") + 0.04 * (knee == 2) + 0.001
    pp[:, PROC["joint_injection"]] = 0.07 * (knee == 3) * out
    pp[:, PROC["physical_therapy"]] = 0.05 * (knee == 3) + 0.04 * dxn("low_back_pain") + 0.2 * new("knee_injury")
    pp[:, PROC["knee_arthroplasty"]] = 0.008 * (knee == 3) * (age > 55)
    pp[:, PROC["audiometry"]] = 0.6 * new("hearing_loss") + 0.005 * out
    pp[:, PROC["spirometry"]] = 0.5 * new("copd") + 0.3 * new("asthma") + 0.005 * out
    pp[:, PROC["echocardiogram"]] = 0.6 * new("heart_failure") + 0.05 * dxn("heart_failure") + 0.005 * (age > 60)
    pp[:, PROC["head_ct"]] = np.where(hosp, 0.08 + 0.3 * symptom[:, PRODROME["fall"]] + 0.9 * new("stroke"), 0.002)
    pp[:, PROC["brain_mri"]] = 0.3 * new("dementia") + 0.5 * new("stroke") + 0.03 * (dementia == 2) + 0.003
    pp[:, PROC["neurocognitive_exam"]] = 0.35 * (new("dementia") | new("mci")) + 0.03 * ((dementia == 1) | (dementia == 2))
    pp[:, PROC["mammography"]] = np.where(out & ~male & (age >= 40) & (age < 75), 0.1, 0.0)
    pp[:, PROC["colonoscopy"]] = np.where(out & (age >= 45) & (age < 75), 0.02, 0.0)
    pp[:, PROC["chest_xray"]] = np.where(out, 0.02, np.where(kind == ED, 0.3, 0.5)) + 0.4 * new("copd") + 0.5 * new("heart_failure")
    return pp


def _emit_background(x: _Visit, rec: _Recorder) -> None:
    """Background acute problems unrelated to the catalog's conditions, and a drug for some of them."""
    T = TABLES
    kind = x.kind
    out = kind == OUT
    hosp = ~out
    present_u = x.U[:, STEP.acute_present]
    choice_u = x.U[:, STEP.acute_choice]
    first_p = np.where(out, 0.35, 0.97)
    second_p = np.where(out, 0.12, 0.45)
    slot1 = present_u[:, 0] < first_p
    code1 = np.where(out, T.acute_out_code[_pick(T.acute_out_cum, choice_u[:, 0])],
                     T.acute_hosp_code[_pick(T.acute_hosp_cum, choice_u[:, 0])])
    rec.add(slot1, code1)
    code2 = np.where(out, T.acute_out_code[_pick(T.acute_out_cum, choice_u[:, 1])],
                     T.acute_hosp_code[_pick(T.acute_hosp_cum, choice_u[:, 1])])
    rec.add(present_u[:, 1] < second_p, code2)
    rec.add(hosp & (present_u[:, 2] < 0.15), T.acute_out_code[_pick(T.acute_out_cum, choice_u[:, 2])])
    acute_drug = slot1 & (kind != IP) & (x.U[:, STEP.acute_drug][:, 0] < 0.3)
    n_drugs = len(T.acute_drug_code)
    rec.add(acute_drug, T.acute_drug_code[np.minimum((x.U[:, STEP.acute_drug][:, 1] * n_drugs).astype(np.int64),
                                                     n_drugs - 1)])


def draw(gens: list, group: np.ndarray, width: int, one_row_per_group: bool) -> np.ndarray:
    """[R, width] uniforms: each row from its group's generator (rows of a group are contiguous, in order)."""
    if len(group) == 0:
        return np.zeros((0, width))
    if one_row_per_group:
        return np.stack([gens[g].random(width) for g in group])
    groups, counts = np.unique(group, return_counts=True)
    return np.concatenate([gens[g].random((n, width)) for g, n in zip(groups, counts)])
