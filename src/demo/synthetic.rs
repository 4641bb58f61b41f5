//! Synthetic FHIR R4 resources for the demo, `carevault seed` and benchmarks. Every value is invented: names
//! come from a small fixed list with a `Demo-` family prefix, phone numbers from the fictional 555-01xx range,
//! addresses from "Demoville"; no value is derived from a real person. Codes are real terminology codes so the
//! data searches and validates like real data.

use rand::Rng;
use rand::seq::SliceRandom;
use serde_json::{Value, json};
use time::{Duration, OffsetDateTime};

/// The identifier system of synthetic medical record numbers.
pub const MRN_SYSTEM: &str = "urn:carevault:demo:mrn";

const SNOMED: &str = "http://snomed.info/sct";
const LOINC: &str = "http://loinc.org";
const RXNORM: &str = "http://www.nlm.nih.gov/research/umls/rxnorm";
const UCUM: &str = "http://unitsofmeasure.org";

const GIVEN_FEMALE: &[&str] = &["Ada", "Bea", "Cleo", "Dora", "Edie", "Fern", "Gwen", "Hana", "Iris", "June"];
const GIVEN_MALE: &[&str] = &["Abe", "Ben", "Cal", "Dev", "Eli", "Finn", "Gus", "Hal", "Ira", "Jon"];
const FAMILY: &[&str] = &[
    "Demo-Ashgrove",
    "Demo-Brightwater",
    "Demo-Copperfield",
    "Demo-Dunmore",
    "Demo-Elderbrook",
    "Demo-Foxglove",
    "Demo-Greystone",
    "Demo-Hollowell",
    "Demo-Ivybridge",
    "Demo-Juniper",
    "Demo-Kettleby",
    "Demo-Larkspur",
];

/// (SNOMED code, display)
const CONDITIONS: &[(&str, &str)] = &[
    ("38341003", "Hypertensive disorder"),
    ("44054006", "Diabetes mellitus type 2"),
    ("195967001", "Asthma"),
    ("55822004", "Hyperlipidemia"),
    ("35489007", "Depressive disorder"),
    ("69896004", "Rheumatoid arthritis"),
];
/// (SNOMED code, display, category)
const ALLERGIES: &[(&str, &str, &str)] = &[
    ("91936005", "Allergy to penicillin", "medication"),
    ("91935009", "Allergy to peanuts", "food"),
    ("300916003", "Latex allergy", "environment"),
];
/// (RxNorm code, display)
const MEDICATIONS: &[(&str, &str)] = &[
    ("314076", "lisinopril 10 MG Oral Tablet"),
    ("861007", "metformin hydrochloride 500 MG Oral Tablet"),
    ("617310", "atorvastatin 20 MG Oral Tablet"),
    ("308191", "amoxicillin 500 MG Oral Capsule"),
];

fn reference(rtype: &str, id: &str) -> Value {
    json!({ "reference": format!("{rtype}/{id}") })
}

/// `YYYY-MM-DDThh:mm:00Z`, whole minutes (infallible, unlike general formatting).
pub fn date_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!("{:04}-{:02}-{:02}T{:02}:{:02}:00Z", t.year(), u8::from(t.month()), t.day(), t.hour(), t.minute())
}

fn pick<'a, T>(rng: &mut impl Rng, items: &'a [T]) -> &'a T {
    &items[rng.gen_range(0..items.len())]
}

/// A Practitioner of the workforce directory.
pub fn practitioner(given: &str, family: &str) -> Value {
    json!({"resourceType": "Practitioner", "active": true, "name": [{"family": family, "given": [given], "prefix": ["Dr"]}]})
}

/// A synthetic Patient: the demographics the front desk registers (no SSN: that comes from registration feeds,
/// not the API).
pub fn patient(rng: &mut impl Rng, now: OffsetDateTime) -> Value {
    let female = rng.gen_bool(0.5);
    let given = if female { pick(rng, GIVEN_FEMALE) } else { pick(rng, GIVEN_MALE) };
    let year = now.year() - rng.gen_range(1..=90);
    json!({
        "resourceType": "Patient",
        "identifier": [{"system": MRN_SYSTEM, "value": format!("DEMO-{:08}", rng.gen_range(0..100_000_000u32))}],
        "name": [{"use": "official", "family": pick(rng, FAMILY), "given": [given]}],
        "gender": if female { "female" } else { "male" },
        "birthDate": format!("{year:04}-{:02}-{:02}", rng.gen_range(1..=12u8), rng.gen_range(1..=28u8)),
        "telecom": [{"system": "phone", "value": format!("555-01{:02}", rng.gen_range(0..100u8)), "use": "home"}],
        "address": [{"line": [format!("{} Example Street", rng.gen_range(1..=999u16))], "city": "Demoville",
                     "state": "DM", "postalCode": "00000"}],
    })
}

/// An active CareTeam for `patient` with the given Practitioners as members.
pub fn care_team(patient: &str, practitioners: &[String]) -> Value {
    let participant: Vec<Value> =
        practitioners.iter().map(|p| json!({"member": reference("Practitioner", p)})).collect();
    json!({"resourceType": "CareTeam", "status": "active", "name": "Demo care team",
           "subject": reference("Patient", patient), "participant": participant})
}

/// A finished ambulatory check-up at `start`.
pub fn encounter(patient: &str, practitioner: &str, start: OffsetDateTime) -> Value {
    json!({
        "resourceType": "Encounter",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB", "display": "ambulatory"},
        "type": [{"coding": [{"system": SNOMED, "code": "185349003", "display": "Encounter for check up"}]}],
        "subject": reference("Patient", patient),
        "participant": [{"individual": reference("Practitioner", practitioner)}],
        "period": {"start": date_time(start), "end": date_time(start + Duration::minutes(30))},
        "reasonCode": [{"text": "Routine check-up"}],
    })
}

/// Vital signs taken at an encounter: heart rate, body temperature, body weight.
pub fn vital_signs(
    rng: &mut impl Rng,
    patient: &str,
    encounter: &str,
    practitioner: &str,
    at: OffsetDateTime,
) -> Vec<Value> {
    let vitals = [
        ("8867-4", "Heart rate", f64::from(rng.gen_range(55..=100u8)), "/min", "beats/minute"),
        ("8310-5", "Body temperature", 36.0 + f64::from(rng.gen_range(0..=15u8)) / 10.0, "Cel", "C"),
        ("29463-7", "Body weight", f64::from(rng.gen_range(45..=120u8)), "kg", "kg"),
    ];
    vitals
        .iter()
        .map(|(code, display, value, ucum, unit)| {
            json!({
                "resourceType": "Observation",
                "status": "final",
                "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                          "code": "vital-signs", "display": "Vital Signs"}]}],
                "code": {"coding": [{"system": LOINC, "code": code, "display": display}], "text": display},
                "subject": reference("Patient", patient),
                "encounter": reference("Encounter", encounter),
                "performer": [reference("Practitioner", practitioner)],
                "effectiveDateTime": date_time(at),
                "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": ucum},
            })
        })
        .collect()
}

/// Problems, allergies and prescriptions recorded at a first visit: each patient gets 0–2 conditions, maybe an
/// allergy, and one prescription per condition treated.
pub fn findings(
    rng: &mut impl Rng,
    patient: &str,
    encounter: &str,
    practitioner: &str,
    at: OffsetDateTime,
) -> Vec<Value> {
    let mut out = Vec::new();
    let n = rng.gen_range(0..=2);
    for (code, display) in CONDITIONS.choose_multiple(rng, n) {
        out.push(json!({
            "resourceType": "Condition",
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
            "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "confirmed"}]},
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category", "code": "encounter-diagnosis"}]}],
            "code": {"coding": [{"system": SNOMED, "code": code, "display": display}], "text": display},
            "subject": reference("Patient", patient),
            "encounter": reference("Encounter", encounter),
            "onsetDateTime": date_time(at - Duration::days(rng.gen_range(30..=2000))),
            "recordedDate": date_time(at),
            "recorder": reference("Practitioner", practitioner),
        }));
        let (rx, med) = pick(rng, MEDICATIONS);
        out.push(json!({
            "resourceType": "MedicationRequest",
            "status": "active",
            "intent": "order",
            "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": rx, "display": med}], "text": med},
            "subject": reference("Patient", patient),
            "encounter": reference("Encounter", encounter),
            "authoredOn": date_time(at),
            "requester": reference("Practitioner", practitioner),
            "dosageInstruction": [{"text": "One by mouth daily"}],
        }));
    }
    if rng.gen_bool(0.4) {
        let (code, display, category) = pick(rng, ALLERGIES);
        out.push(json!({
            "resourceType": "AllergyIntolerance",
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active"}]},
            "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification", "code": "confirmed"}]},
            "type": "allergy",
            "category": [category],
            "criticality": "low",
            "code": {"coding": [{"system": SNOMED, "code": code, "display": display}], "text": display},
            "patient": reference("Patient", patient),
            "recordedDate": date_time(at),
            "recorder": reference("Practitioner", practitioner),
        }));
    }
    out
}

/// Start times of a patient's visits: 1–3 check-ups within the last two years, oldest first, in office hours.
pub fn visit_times(rng: &mut impl Rng, now: OffsetDateTime) -> Vec<OffsetDateTime> {
    let mut days: Vec<i64> = (0..rng.gen_range(1..=3)).map(|_| rng.gen_range(1..730)).collect();
    days.sort_unstable_by(|a, b| b.cmp(a));
    days.dedup();
    let midnight = now.replace_time(time::Time::MIDNIGHT);
    days.into_iter()
        .map(|d| {
            midnight - Duration::days(d)
                + Duration::hours(rng.gen_range(8..17))
                + Duration::minutes(15 * rng.gen_range(0..4))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn everything_generated_is_valid_fhir() {
        let v = crate::fhir::FhirValidator::new().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let now = time::macros::datetime!(2026-03-01 09:00 UTC);
        let id = "0b6f3f0e-6f1c-4d57-9d68-2d1c3a2b7a10";
        let mut all =
            vec![practitioner("Ada", "Demo-Ashgrove"), care_team(id, &[id.to_owned()]), encounter(id, id, now)];
        for _ in 0..20 {
            all.push(patient(&mut rng, now));
            all.extend(vital_signs(&mut rng, id, id, id, now));
            all.extend(findings(&mut rng, id, id, id, now));
        }
        for r in &all {
            let rtype = r["resourceType"].as_str().unwrap();
            assert!(v.validate(rtype, r).is_ok(), "{r}");
        }
        assert!(all.iter().any(|r| r["resourceType"] == "Condition"));
        assert!(all.iter().any(|r| r["resourceType"] == "AllergyIntolerance"));
    }

    #[test]
    fn names_are_obviously_synthetic_and_times_are_past() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let now = time::macros::datetime!(2026-03-01 09:00 UTC);
        for _ in 0..50 {
            let p = patient(&mut rng, now);
            assert!(p["name"][0]["family"].as_str().unwrap().starts_with("Demo-"));
            assert!(p["telecom"][0]["value"].as_str().unwrap().starts_with("555-01"));
            let times = visit_times(&mut rng, now);
            assert!(!times.is_empty() && times.windows(2).all(|w| w[0] < w[1]) && times.iter().all(|t| *t < now));
        }
        assert_eq!(date_time(time::macros::datetime!(2026-03-01 09:05:33 UTC)), "2026-03-01T09:05:00Z");
    }
}
