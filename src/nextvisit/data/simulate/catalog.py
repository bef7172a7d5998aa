"""What the synthetic health system can record: its conditions (with their onset hazards, risk factors,
detection and recurrence), drugs, labs and vitals, procedures and background codes, each with a MEDS code
and a description.

Hazards are per year at a reference age, log-linear in age (per decade), sex, BMI, latent vulnerabilities
and other conditions. Risk factors follow the direction of published associations (dementia: age,
hypertension, diabetes, depression, hearing loss, stroke, atrial fibrillation, MCI; knee OA: age, female
sex, obesity, prior knee injury); magnitudes are chosen so that a cohort resembles a US health system, not
fitted to any source.

Code conventions (docs/interfaces.md section 1): ``ICD10CM//<dotted code>``, ``RXNORM//<ingredient id>``,
``LOINC//<code>`` with a numeric value, ``CPT//<code>``, ``VISIT//<kind>``. Mild cognitive impairment is
coded ``F06.70`` (mild neurocognitive disorder), not ``G31.84``, because G31.84 belongs to the published
dementia code set and would make every MCI diagnosis a dementia onset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Condition:
    """A chronic (or once-acute, then historical) condition.

    Stages of a condition in a subject: 0 absent, 1 prodromal (only when ``prodrome_years`` > 0; the
    subject shows prodromal signs but cannot be diagnosed yet), 2 present but not diagnosed, 3 diagnosed.
    """

    name: str
    codes: tuple[tuple[str, str, float], ...]  # (ICD-10-CM code, description, share of diagnoses)
    rate_per_year: float  # onset hazard at ref_age for a reference subject (female, BMI 25, no risk factors)
    ref_age: float = 60.0
    age_log_hr_per_decade: float = 0.0
    min_age: float = 0.0
    male_log_hr: float = 0.0  # log hazard ratio for male sex; -inf: female only, sex_only="M": male only
    sex_only: str | None = None
    bmi_log_hr: float = 0.0  # per BMI unit above 25
    frailty_log_hr: float = 0.2
    risk_factors: tuple[tuple[str, float], ...] = ()  # (other condition present, log hazard ratio)
    prodrome_years: float = 0.0  # mean time from prodrome onset to a diagnosable condition
    p_detect: tuple[float, float, float] = (0.35, 0.2, 0.5)  # per outpatient / emergency / inpatient visit
    p_recur: float = 0.6  # chance a diagnosed condition is coded again at a later outpatient visit
    acute_presentation: str | None = None  # onset itself brings the subject in: "EMERGENCY" or "INPATIENT"
    recur_code: tuple[str, str] | None = None  # code used after the onset visit (e.g. history of stroke)
    death_log_hr: float = 0.0
    visit_log_hr: float = 0.1  # outpatient visit rate, once diagnosed
    p_known_at_entry: float = 0.8  # a condition present before entry into care is already diagnosed
    event_drugs: tuple[str, ...] = ()  # drugs whose first record also counts as the condition's onset


@dataclass(frozen=True)
class Drug:
    name: str
    rxnorm: str
    indications: tuple[tuple[str, float], ...]  # (condition, chance per visit to start once diagnosed)
    p_refill: float = 0.38  # chance to be recorded again at a later visit once started


@dataclass(frozen=True)
class Lab:
    name: str
    loinc: str
    description: str


CONDITIONS: tuple[Condition, ...] = (
    Condition("hypertension", (("I10", "Essential (primary) hypertension", 1.0),), 0.028, 50, 0.45, 18,
              male_log_hr=0.15, bmi_log_hr=0.06, p_detect=(0.45, 0.3, 0.5), p_recur=0.75, visit_log_hr=0.1),
    Condition("hyperlipidemia", (("E78.5", "Hyperlipidemia, unspecified", 0.7),
                                 ("E78.00", "Pure hypercholesterolemia, unspecified", 0.3)), 0.03, 50, 0.35, 20,
              male_log_hr=0.2, bmi_log_hr=0.03, p_detect=(0.3, 0.05, 0.2), p_recur=0.6),
    Condition("type2_diabetes", (("E11.9", "Type 2 diabetes mellitus without complications", 0.8),
                                 ("E11.65", "Type 2 diabetes mellitus with hyperglycemia", 0.2)), 0.006, 50, 0.35, 15,
              male_log_hr=0.2, bmi_log_hr=0.12, p_detect=(0.5, 0.3, 0.6), p_recur=0.8, death_log_hr=0.3,
              visit_log_hr=0.2),
    Condition("obesity", (("E66.9", "Obesity, unspecified", 1.0),), 0.0, p_detect=(0.25, 0.02, 0.1),
              p_recur=0.4, p_known_at_entry=0.3),  # present while BMI >= 30 (no hazard)
    Condition("depression", (("F32.9", "Major depressive disorder, single episode, unspecified", 0.7),
                             ("F33.1", "Major depressive disorder, recurrent, moderate", 0.3)), 0.009, 40, -0.05, 12,
              male_log_hr=-0.5, p_detect=(0.35, 0.1, 0.3), p_recur=0.6),
    Condition("anxiety", (("F41.9", "Anxiety disorder, unspecified", 0.6),
                          ("F41.1", "Generalized anxiety disorder", 0.4)), 0.008, 40, -0.1, 10,
              male_log_hr=-0.5, risk_factors=(("depression", 0.8),), p_detect=(0.3, 0.1, 0.2), p_recur=0.5),
    Condition("hearing_loss", (("H91.90", "Unspecified hearing loss, unspecified ear", 0.7),
                               ("H90.3", "Sensorineural hearing loss, bilateral", 0.3)), 0.006, 65, 0.9, 40,
              male_log_hr=0.3, p_detect=(0.25, 0.0, 0.05), p_recur=0.35),
    Condition("atrial_fibrillation", (("I48.91", "Unspecified atrial fibrillation", 1.0),), 0.005, 65, 0.8, 35,
              male_log_hr=0.4, bmi_log_hr=0.03, risk_factors=(("hypertension", 0.5), ("heart_failure", 0.8)),
              p_detect=(0.45, 0.6, 0.8), p_recur=0.7, death_log_hr=0.2, visit_log_hr=0.15),
    Condition("ckd", (("N18.30", "Chronic kidney disease, stage 3 unspecified", 0.8),
                      ("N18.4", "Chronic kidney disease, stage 4 (severe)", 0.2)), 0.003, 60, 0.8, 30,
              risk_factors=(("hypertension", 0.7), ("type2_diabetes", 0.9)), p_detect=(0.35, 0.2, 0.5),
              p_recur=0.6, death_log_hr=0.5, visit_log_hr=0.15),
    Condition("coronary_artery_disease", (("I25.10", "Atherosclerotic heart disease of native coronary artery "
                                           "without angina pectoris", 1.0),), 0.004, 60, 0.6, 35,
              male_log_hr=0.6, risk_factors=(("hypertension", 0.5), ("hyperlipidemia", 0.5),
                                             ("type2_diabetes", 0.5), ("tobacco_use", 0.6)),
              p_detect=(0.35, 0.4, 0.6), p_recur=0.7, death_log_hr=0.3),
    Condition("heart_failure", (("I50.9", "Heart failure, unspecified", 0.7),
                                ("I50.32", "Chronic diastolic (congestive) heart failure", 0.3)), 0.002, 65, 0.9, 40,
              bmi_log_hr=0.04, risk_factors=(("hypertension", 0.6), ("atrial_fibrillation", 0.8),
                                             ("coronary_artery_disease", 1.0), ("type2_diabetes", 0.5)),
              p_detect=(0.5, 0.6, 0.9), p_recur=0.8, death_log_hr=0.9, visit_log_hr=0.3),
    Condition("tobacco_use", (("F17.210", "Nicotine dependence, cigarettes, uncomplicated", 1.0),), 0.012, 25,
              -0.5, 14, male_log_hr=0.3, p_detect=(0.5, 0.3, 0.5), p_recur=0.5, death_log_hr=0.4,
              visit_log_hr=0.0),
    Condition("copd", (("J44.9", "Chronic obstructive pulmonary disease, unspecified", 1.0),), 0.002, 60, 0.6, 40,
              risk_factors=(("tobacco_use", 1.6),), p_detect=(0.45, 0.5, 0.8), p_recur=0.7, death_log_hr=0.6,
              visit_log_hr=0.25),
    Condition("asthma", (("J45.909", "Unspecified asthma, uncomplicated", 1.0),), 0.003, 20, -0.1, 2,
              bmi_log_hr=0.03, p_detect=(0.4, 0.4, 0.5), p_recur=0.5),
    Condition("stroke", (("I63.9", "Cerebral infarction, unspecified", 1.0),), 0.0012, 65, 0.8, 30,
              risk_factors=(("hypertension", 0.8), ("atrial_fibrillation", 1.0), ("type2_diabetes", 0.4),
                            ("tobacco_use", 0.5)),
              acute_presentation="INPATIENT", recur_code=("Z86.73", "Personal history of transient ischemic "
                                                          "attack (TIA), and cerebral infarction without residual deficits"),
              p_recur=0.45, death_log_hr=0.6, visit_log_hr=0.2),
    Condition("mci", (("F06.70", "Mild neurocognitive disorder due to known physiological condition without "
                                 "behavioral disturbance", 1.0),), 0.002, 70, 1.0, 50,
              risk_factors=(("dementia", 2.3), ("stroke", 0.5), ("parkinsons", 1.0)),
              p_detect=(0.2, 0.02, 0.05), p_recur=0.55),
    Condition("dementia", (("F03.90", "Unspecified dementia without behavioral disturbance", 0.5),
                           ("G30.9", "Alzheimer's disease, unspecified", 0.3),
                           ("F01.50", "Vascular dementia without behavioral disturbance", 0.2)),
              0.005, 75, 1.1, 50, male_log_hr=-0.1,
              risk_factors=(("hypertension", 0.3), ("type2_diabetes", 0.4), ("depression", 0.5),
                            ("hearing_loss", 0.4), ("stroke", 0.8), ("atrial_fibrillation", 0.3),
                            ("mci", 1.0), ("parkinsons", 1.0)),
              prodrome_years=2.5, p_detect=(0.3, 0.1, 0.25), p_recur=0.75, death_log_hr=0.8, visit_log_hr=0.2,
              event_drugs=("donepezil", "memantine", "rivastigmine", "galantamine")),
    Condition("knee_injury", (("S83.209A", "Tear of unspecified meniscus, current injury, unspecified knee, "
                                           "initial encounter", 0.6),
                              ("S83.509A", "Sprain of unspecified cruciate ligament of unspecified knee, "
                                           "initial encounter", 0.4)), 0.004, 35, -0.2, 10,
              male_log_hr=0.2, acute_presentation="EMERGENCY",
              recur_code=("M23.90", "Unspecified internal derangement of unspecified knee"), p_recur=0.12,
              visit_log_hr=0.0),
    Condition("hip_oa", (("M16.9", "Osteoarthritis of hip, unspecified", 1.0),), 0.003, 60, 0.7, 40,
              male_log_hr=-0.2, bmi_log_hr=0.04, p_detect=(0.3, 0.05, 0.2), p_recur=0.55),
    Condition("knee_oa", (("M17.0", "Bilateral primary osteoarthritis of knee", 0.4),
                          ("M17.11", "Unilateral primary osteoarthritis, right knee", 0.3),
                          ("M17.12", "Unilateral primary osteoarthritis, left knee", 0.3)),
              0.0045, 60, 0.6, 35, male_log_hr=-0.45, bmi_log_hr=0.1,
              risk_factors=(("knee_injury", 1.0),), prodrome_years=2.0, p_detect=(0.28, 0.05, 0.1),
              p_recur=0.6, visit_log_hr=0.05),
    Condition("osteoporosis", (("M81.0", "Age-related osteoporosis without current pathological fracture", 1.0),),
              0.004, 65, 1.0, 45, male_log_hr=-1.5, bmi_log_hr=-0.05, p_detect=(0.25, 0.1, 0.3), p_recur=0.5),
    Condition("hypothyroidism", (("E03.9", "Hypothyroidism, unspecified", 1.0),), 0.003, 50, 0.3, 10,
              male_log_hr=-1.2, p_detect=(0.4, 0.05, 0.2), p_recur=0.6),
    Condition("gerd", (("K21.9", "Gastro-esophageal reflux disease without esophagitis", 1.0),), 0.005, 45, 0.2, 15,
              bmi_log_hr=0.04, p_detect=(0.4, 0.2, 0.3), p_recur=0.5),
    Condition("anemia", (("D64.9", "Anemia, unspecified", 1.0),), 0.004, 50, 0.3, 5, male_log_hr=-0.4,
              risk_factors=(("ckd", 1.0),), p_detect=(0.3, 0.4, 0.6), p_recur=0.4),
    Condition("sleep_apnea", (("G47.33", "Obstructive sleep apnea (adult) (pediatric)", 1.0),), 0.004, 50, 0.3, 18,
              male_log_hr=0.7, bmi_log_hr=0.1, p_detect=(0.25, 0.0, 0.1), p_recur=0.5),
    Condition("low_back_pain", (("M54.50", "Low back pain, unspecified", 1.0),), 0.008, 45, 0.0, 18,
              bmi_log_hr=0.03, p_detect=(0.5, 0.4, 0.3), p_recur=0.35, visit_log_hr=0.05),
    Condition("bph", (("N40.0", "Benign prostatic hyperplasia without lower urinary tract symptoms", 1.0),),
              0.012, 60, 0.6, 40, sex_only="M", p_detect=(0.35, 0.05, 0.2), p_recur=0.5),
    Condition("gout", (("M10.9", "Gout, unspecified", 1.0),), 0.002, 50, 0.3, 20, male_log_hr=1.0,
              bmi_log_hr=0.06, risk_factors=(("ckd", 0.7),), p_detect=(0.5, 0.5, 0.5), p_recur=0.4),
    Condition("parkinsons", (("G20", "Parkinson's disease", 1.0),), 0.0004, 65, 1.0, 45, male_log_hr=0.4,
              p_detect=(0.4, 0.1, 0.3), p_recur=0.7, death_log_hr=0.5, visit_log_hr=0.2),
    Condition("neuropathy", (("G62.9", "Polyneuropathy, unspecified", 1.0),), 0.0015, 55, 0.5, 30,
              risk_factors=(("type2_diabetes", 1.5),), p_detect=(0.3, 0.05, 0.2), p_recur=0.45),
    Condition("cataract", (("H26.9", "Unspecified cataract", 1.0),), 0.01, 65, 1.0, 40,
              risk_factors=(("type2_diabetes", 0.5),), p_detect=(0.2, 0.0, 0.02), p_recur=0.2,
              visit_log_hr=0.0),
    Condition("migraine", (("G43.909", "Migraine, unspecified, not intractable, without status migrainosus", 1.0),),
              0.006, 30, -0.3, 10, male_log_hr=-1.0, p_detect=(0.4, 0.4, 0.3), p_recur=0.35),
    Condition("allergic_rhinitis", (("J30.9", "Allergic rhinitis, unspecified", 1.0),), 0.006, 30, -0.2, 2,
              p_detect=(0.35, 0.05, 0.05), p_recur=0.3, visit_log_hr=0.0),
    Condition("insomnia", (("G47.00", "Insomnia, unspecified", 1.0),), 0.006, 50, 0.1, 15, male_log_hr=-0.3,
              risk_factors=(("depression", 0.8), ("anxiety", 0.6)), p_detect=(0.3, 0.05, 0.1), p_recur=0.35),
)

DRUGS: tuple[Drug, ...] = (
    Drug("lisinopril", "29046", (("hypertension", 0.45), ("heart_failure", 0.2), ("ckd", 0.1))),
    Drug("amlodipine", "17767", (("hypertension", 0.3),)),
    Drug("hydrochlorothiazide", "5487", (("hypertension", 0.2),)),
    Drug("losartan", "52175", (("hypertension", 0.2), ("ckd", 0.15))),
    Drug("metoprolol", "6918", (("atrial_fibrillation", 0.5), ("coronary_artery_disease", 0.3),
                                ("heart_failure", 0.2))),
    Drug("carvedilol", "20352", (("heart_failure", 0.45),)),
    Drug("furosemide", "4603", (("heart_failure", 0.7),)),
    Drug("spironolactone", "9997", (("heart_failure", 0.3),)),
    Drug("apixaban", "1364430", (("atrial_fibrillation", 0.55),)),
    Drug("warfarin", "11289", (("atrial_fibrillation", 0.15),)),
    Drug("atorvastatin", "83367", (("hyperlipidemia", 0.55), ("coronary_artery_disease", 0.4), ("stroke", 0.3))),
    Drug("simvastatin", "36567", (("hyperlipidemia", 0.15),)),
    Drug("aspirin", "1191", (("coronary_artery_disease", 0.5), ("stroke", 0.4))),
    Drug("clopidogrel", "32968", (("stroke", 0.4), ("coronary_artery_disease", 0.15))),
    Drug("metformin", "6809", (("type2_diabetes", 0.8),)),
    Drug("glipizide", "4821", (("type2_diabetes", 0.12),)),
    Drug("insulin_glargine", "274783", (("type2_diabetes", 0.08),)),
    Drug("empagliflozin", "1545653", (("type2_diabetes", 0.08), ("heart_failure", 0.05))),
    Drug("sertraline", "36437", (("depression", 0.35), ("anxiety", 0.2))),
    Drug("escitalopram", "321988", (("depression", 0.25), ("anxiety", 0.2))),
    Drug("fluoxetine", "4493", (("depression", 0.15),)),
    Drug("bupropion", "42347", (("depression", 0.1), ("tobacco_use", 0.05))),
    Drug("trazodone", "10737", (("insomnia", 0.3), ("depression", 0.05))),
    Drug("donepezil", "135447", (("dementia", 0.6),)),
    Drug("memantine", "6719", (("dementia", 0.25),)),
    Drug("rivastigmine", "183379", (("dementia", 0.05),)),
    Drug("galantamine", "4637", (("dementia", 0.03),)),
    Drug("levodopa", "6375", (("parkinsons", 0.8),)),
    Drug("tiotropium", "69120", (("copd", 0.5),)),
    Drug("albuterol", "435", (("copd", 0.6), ("asthma", 0.7))),
    Drug("fluticasone", "41126", (("asthma", 0.4), ("allergic_rhinitis", 0.5))),
    Drug("montelukast", "88249", (("asthma", 0.2),)),
    Drug("levothyroxine", "10582", (("hypothyroidism", 0.9),)),
    Drug("omeprazole", "7646", (("gerd", 0.7),)),
    Drug("alendronate", "46041", (("osteoporosis", 0.5),)),
    Drug("tamsulosin", "77492", (("bph", 0.6),)),
    Drug("allopurinol", "519", (("gout", 0.5),)),
    Drug("colchicine", "2683", (("gout", 0.3),)),
    Drug("gabapentin", "25480", (("neuropathy", 0.5), ("low_back_pain", 0.08))),
    Drug("meloxicam", "41493", (("knee_oa", 0.35), ("hip_oa", 0.3), ("low_back_pain", 0.1))),
    Drug("sumatriptan", "37418", (("migraine", 0.5),)),
    Drug("ferrous_sulfate", "4450", (("anemia", 0.4),)),
    Drug("tramadol", "10689", (("knee_oa", 0.1), ("hip_oa", 0.1))),
)

# Drugs given for a symptom at one visit (no repeat), e.g. NSAIDs for knee or back pain.
ON_DEMAND_DRUGS: tuple[tuple[str, str], ...] = (("ibuprofen", "5640"), ("naproxen", "7258"))
# Short-course drugs for acute problems, chosen with the acute code at some visits.
ACUTE_DRUGS: tuple[tuple[str, str], ...] = (
    ("amoxicillin", "723"), ("azithromycin", "18631"), ("cephalexin", "2231"), ("prednisone", "8640"),
    ("ondansetron", "26225"), ("acetaminophen", "161"), ("cyclobenzaprine", "21949"),
)

LABS: tuple[Lab, ...] = (
    # vitals
    Lab("sbp", "8480-6", "Systolic blood pressure [mm Hg]"),
    Lab("dbp", "8462-4", "Diastolic blood pressure [mm Hg]"),
    Lab("bmi", "39156-5", "Body mass index (BMI) [Ratio]"),
    Lab("weight", "29463-7", "Body weight [kg]"),
    Lab("heart_rate", "8867-4", "Heart rate [/min]"),
    # basic metabolic panel
    Lab("glucose", "2345-7", "Glucose [Mass/volume] in Serum or Plasma [mg/dL]"),
    Lab("creatinine", "2160-0", "Creatinine [Mass/volume] in Serum or Plasma [mg/dL]"),
    Lab("egfr", "33914-3", "Glomerular filtration rate/1.73 sq M.predicted (MDRD) [mL/min/1.73m2]"),
    Lab("potassium", "2823-3", "Potassium [Moles/volume] in Serum or Plasma [mmol/L]"),
    Lab("sodium", "2951-2", "Sodium [Moles/volume] in Serum or Plasma [mmol/L]"),
    # lipid panel
    Lab("ldl", "13457-7", "Cholesterol in LDL [Mass/volume] in Serum or Plasma by calculation [mg/dL]"),
    Lab("hdl", "2085-9", "Cholesterol in HDL [Mass/volume] in Serum or Plasma [mg/dL]"),
    Lab("total_cholesterol", "2093-3", "Cholesterol [Mass/volume] in Serum or Plasma [mg/dL]"),
    # others
    Lab("hba1c", "4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood [%]"),
    Lab("hemoglobin", "718-7", "Hemoglobin [Mass/volume] in Blood [g/dL]"),
    Lab("wbc", "6690-2", "Leukocytes [#/volume] in Blood by Automated count [10*3/uL]"),
    Lab("tsh", "3016-3", "Thyrotropin [Units/volume] in Serum or Plasma [m[IU]/L]"),
    Lab("alt", "1742-6", "Alanine aminotransferase [Enzymatic activity/volume] in Serum or Plasma [U/L]"),
    Lab("nt_probnp", "33762-6", "Natriuretic peptide.B prohormone N-Terminal [Mass/volume] in Serum or Plasma [pg/mL]"),
    Lab("moca", "72172-0", "Total score [MoCA]"),
)

PROCEDURES: tuple[tuple[str, str, str], ...] = (
    ("office_visit_low", "99213", "Office/outpatient visit, established patient, low complexity"),
    ("office_visit_moderate", "99214", "Office/outpatient visit, established patient, moderate complexity"),
    ("preventive_adult", "99396", "Periodic preventive medicine, established patient, 40-64 years"),
    ("preventive_senior", "99397", "Periodic preventive medicine, established patient, 65 years and older"),
    ("ed_visit", "99284", "Emergency department visit, moderate to high severity"),
    ("inpatient_admission", "99223", "Initial hospital inpatient care, high complexity"),
    ("venipuncture", "36415", "Collection of venous blood by venipuncture"),
    ("ecg", "93000", "Electrocardiogram, routine, with interpretation and report"),
    ("flu_vaccine", "90686", "Influenza virus vaccine, quadrivalent, intramuscular"),
    ("knee_xray", "73560", "Radiologic examination, knee; 1 or 2 views"),
    ("knee_mri", "73721", "Magnetic resonance imaging, any joint of lower extremity, without contrast"),
    ("joint_injection", "20610", "Arthrocentesis, aspiration and/or injection, major joint"),
    ("physical_therapy", "97110", "Therapeutic procedure, therapeutic exercises"),
    ("knee_arthroplasty", "27447", "Arthroplasty, knee, condyle and plateau (total knee arthroplasty)"),
    ("audiometry", "92557", "Comprehensive audiometry threshold evaluation and speech recognition"),
    ("spirometry", "94010", "Spirometry"),
    ("echocardiogram", "93306", "Echocardiography, transthoracic, complete"),
    ("head_ct", "70450", "Computed tomography, head or brain; without contrast material"),
    ("brain_mri", "70551", "Magnetic resonance imaging, brain; without contrast material"),
    ("neurocognitive_exam", "96116", "Neurobehavioral status examination"),
    ("mammography", "77067", "Screening mammography, bilateral"),
    ("colonoscopy", "45378", "Colonoscopy, flexible; diagnostic"),
    ("chest_xray", "71046", "Radiologic examination, chest; 2 views"),
)

# Background (acute, self-limited) problems: (code, description, weight) at outpatient visits ...
ACUTE_OUTPATIENT: tuple[tuple[str, str, float], ...] = (
    ("J06.9", "Acute upper respiratory infection, unspecified", 10.0),
    ("J01.90", "Acute sinusitis, unspecified", 4.0),
    ("J20.9", "Acute bronchitis, unspecified", 4.0),
    ("N39.0", "Urinary tract infection, site not specified", 5.0),
    ("R51.9", "Headache, unspecified", 3.0),
    ("R10.9", "Unspecified abdominal pain", 3.0),
    ("R05.9", "Cough, unspecified", 4.0),
    ("R53.83", "Other fatigue", 3.0),
    ("R42", "Dizziness and giddiness", 2.0),
    ("L30.9", "Dermatitis, unspecified", 3.0),
    ("H10.9", "Unspecified conjunctivitis", 2.0),
    ("H66.90", "Otitis media, unspecified, unspecified ear", 3.0),
    ("K59.00", "Constipation, unspecified", 2.0),
    ("R11.0", "Nausea", 1.0),
    ("M79.609", "Pain in unspecified limb", 2.0),
    ("S93.401A", "Sprain of unspecified ligament of unspecified ankle, initial encounter", 1.0),
    ("Z00.00", "Encounter for general adult medical examination without abnormal findings", 8.0),
    ("Z23", "Encounter for immunization", 8.0),
    ("J11.1", "Influenza due to unidentified influenza virus with other respiratory manifestations", 1.0),
    ("R21", "Rash and other nonspecific skin eruption", 2.0),
    ("M25.50", "Pain in unspecified joint", 2.0),
    ("E55.9", "Vitamin D deficiency, unspecified", 2.0),
    ("R73.03", "Prediabetes", 2.0),
)
# ... and at emergency and inpatient days.
ACUTE_HOSPITAL: tuple[tuple[str, str, float], ...] = (
    ("R07.9", "Chest pain, unspecified", 6.0),
    ("J18.9", "Pneumonia, unspecified organism", 4.0),
    ("N39.0", "Urinary tract infection, site not specified", 3.0),
    ("R55", "Syncope and collapse", 2.0),
    ("L03.90", "Cellulitis, unspecified", 3.0),
    ("A09", "Infectious gastroenteritis and colitis, unspecified", 3.0),
    ("S09.90XA", "Unspecified injury of head, initial encounter", 1.0),
    ("S52.501A", "Unspecified fracture of the lower end of right radius, initial encounter for closed fracture", 1.0),
    ("R10.9", "Unspecified abdominal pain", 5.0),
    ("E86.0", "Dehydration", 2.0),
    ("N17.9", "Acute kidney failure, unspecified", 1.0),
    ("A41.9", "Sepsis, unspecified organism", 1.0),
    ("S72.001A", "Fracture of unspecified part of neck of right femur, initial encounter for closed fracture", 0.5),
    ("R06.02", "Shortness of breath", 3.0),
)

# Prodromal and symptom codes.
PRODROME_CODES: tuple[tuple[str, str, str], ...] = (
    ("memory_complaint", "R41.3", "Other amnesia"),
    ("cognitive_decline", "R41.81", "Age-related cognitive decline"),
    ("repeated_falls", "R29.6", "Repeated falls"),
    ("fall", "W19.XXXA", "Unspecified fall, initial encounter"),
    ("knee_pain_right", "M25.561", "Pain in right knee"),
    ("knee_pain_left", "M25.562", "Pain in left knee"),
    ("difficulty_walking", "R26.2", "Difficulty in walking, not elsewhere classified"),
)

VISIT_KINDS = ("OUTPATIENT", "EMERGENCY", "INPATIENT")
VISIT_DESCRIPTIONS = {"OUTPATIENT": "Outpatient visit", "EMERGENCY": "Emergency department visit",
                      "INPATIENT": "Inpatient admission day"}

SEXES = (("F", "Female"), ("M", "Male"))
RACES = (("WHITE", "White", 0.62), ("BLACK", "Black or African American", 0.14), ("ASIAN", "Asian", 0.07),
         ("OTHER", "Other race", 0.12), ("UNKNOWN", "Race unknown", 0.05))
ETHNICITIES = (("NOT_HISPANIC", "Not Hispanic or Latino", 0.78), ("HISPANIC", "Hispanic or Latino", 0.18),
               ("UNKNOWN", "Ethnicity unknown", 0.04))


@dataclass
class CodeBook:
    """Every code the simulator can write, by index, with its description; index lookups by role."""

    codes: list[str] = field(default_factory=list)
    descriptions: list[str] = field(default_factory=list)
    _index: dict[str, int] = field(default_factory=dict)

    def add(self, code: str, description: str) -> int:
        if code not in self._index:
            self._index[code] = len(self.codes)
            self.codes.append(code)
            self.descriptions.append(description)
        return self._index[code]

    def __getitem__(self, code: str) -> int:
        return self._index[code]


def build_codebook() -> CodeBook:
    """All codes in a fixed order (the index is the simulator's internal code id)."""
    book = CodeBook()
    book.add("MEDS_BIRTH", "Birth")
    book.add("MEDS_DEATH", "Death")
    for code, desc in SEXES:
        book.add(f"GENDER//{code}", desc)
    for code, desc, _ in RACES:
        book.add(f"RACE//{code}", desc)
    for code, desc, _ in ETHNICITIES:
        book.add(f"ETHNICITY//{code}", desc)
    for kind in VISIT_KINDS:
        book.add(f"VISIT//{kind}", VISIT_DESCRIPTIONS[kind])
    for condition in CONDITIONS:
        for code, desc, _ in condition.codes:
            book.add(f"ICD10CM//{code}", desc)
        if condition.recur_code:
            book.add(f"ICD10CM//{condition.recur_code[0]}", condition.recur_code[1])
    for drug in DRUGS:
        book.add(f"RXNORM//{drug.rxnorm}", drug.name.replace("_", " "))
    for name, rxnorm in ON_DEMAND_DRUGS + ACUTE_DRUGS:
        book.add(f"RXNORM//{rxnorm}", name)
    for lab in LABS:
        book.add(f"LOINC//{lab.loinc}", lab.description)
    for _, cpt, desc in PROCEDURES:
        book.add(f"CPT//{cpt}", desc)
    for code, desc, _ in ACUTE_OUTPATIENT + ACUTE_HOSPITAL:
        book.add(f"ICD10CM//{code}", desc)
    for _, code, desc in PRODROME_CODES:
        book.add(f"ICD10CM//{code}", desc)
    return book


def condition_index(name: str) -> int:
    for i, condition in enumerate(CONDITIONS):
        if condition.name == name:
            return i
    raise KeyError(name)


def risk_matrix() -> np.ndarray:
    """[C, C] log hazard ratios: entry (a, b) applies to the onset of b while a is present."""
    matrix = np.zeros((len(CONDITIONS), len(CONDITIONS)))
    for b, condition in enumerate(CONDITIONS):
        for name, log_hr in condition.risk_factors:
            matrix[condition_index(name), b] = log_hr
    return matrix
