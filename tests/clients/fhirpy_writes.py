"""carevault writes with fhirpy 2.x: conditional create (get_or_create), update with If-Match, JSON Patch,
conditional update and delete, a transaction and a batch Bundle, as a front-desk service client.

Environment: CAREVAULT_FHIR_BASE (default https://127.0.0.1:8443/fhir), CAREVAULT_CLIENT_ID and
CAREVAULT_CLIENT_SECRET (from `carevault users add --service --role front_desk`), CAREVAULT_CA (the certificate
to trust, default data/tls/cert.pem). Each step prints one JSON line.
"""

import json
import os
import uuid

import requests
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import MultipleResourcesFound, ResourceNotFound

BASE = os.environ.get("CAREVAULT_FHIR_BASE", "https://127.0.0.1:8443/fhir")
CA = os.environ.get("CAREVAULT_CA", "data/tls/cert.pem")  # keep TLS verification on
MRN = "https://carevault.example/fhir/sid/mrn"  # a medical record number system (synthetic)


def report(step, **fields):
    print(json.dumps({"step": step, **fields}), flush=True)


# 1. A token (as in the first fhirpy example).
smart = requests.get(f"{BASE}/.well-known/smart-configuration", verify=CA, timeout=10).json()
token = requests.post(
    smart["token_endpoint"],
    data={"grant_type": "client_credentials"},
    auth=(os.environ["CAREVAULT_CLIENT_ID"], os.environ["CAREVAULT_CLIENT_SECRET"]),
    verify=CA,
    timeout=10,
)
token.raise_for_status()
client = SyncFHIRClient(
    BASE, authorization=f"Bearer {token.json()['access_token']}", requests_config={"verify": CA, "timeout": 10}
)
report("token", expires_in=token.json()["expires_in"])


# fhirpy's calls take no per-request headers: If-Match (and a content type) go in the client's extra headers for
# that one call.
def with_headers(headers, call):
    client.extra_headers = headers
    try:
        return call()
    finally:
        client.extra_headers = None


# 2. Conditional create: get_or_create() sends the search with the POST (POST Patient?identifier=…); the second
# call finds the first patient instead of making a duplicate.
family = f"FhirpyW-{uuid.uuid4().hex[:8]}"
mrn = uuid.uuid4().hex[:12]
registered = client.resources("Patient").search(identifier=f"{MRN}|{mrn}")
first, first_created = registered.get_or_create(
    client.resource(
        "Patient",
        identifier=[{"system": MRN, "value": mrn}],
        name=[{"family": family, "given": ["Ada"]}],
        gender="female",
        birthDate="1990-04-01",
        telecom=[{"system": "phone", "value": "555-0100", "use": "home"}],
    )
)
again, again_created = registered.get_or_create(
    client.resource("Patient", identifier=[{"system": MRN, "value": mrn}], name=[{"family": family}])
)
report("get-or-create", ids=[first.id, again.id], created=[first_created, again_created], family=family, mrn=mrn)

# 3. Update with If-Match (the version you read); a stale version is 412 (fhirpy: MultipleResourcesFound).
patient = client.reference("Patient", first.id).to_resource()
patient.address = [{"city": "Springfield", "state": "IL", "postalCode": "62701"}]
with_headers({"If-Match": f'W/"{patient.meta.versionId}"'}, patient.save)
report("update", id=patient.id, versionId=patient.meta.versionId)
try:
    with_headers({"If-Match": 'W/"1"'}, patient.save)
    report("stale-update", status=200)
except MultipleResourcesFound as e:
    report("stale-update", status=412, outcome=json.loads(str(e))["resourceType"])

# 4. Patch, with If-Match as for PUT. JSON Patch (application/json-patch+json) goes through execute(); fhirpy's
# own patch() sends the named fields as a JSON object (application/json), which carevault applies as a JSON Merge
# Patch.
ops = [{"op": "replace", "path": "/telecom/0/value", "value": "555-0199"}]
patched = with_headers(
    {"Content-Type": "application/json-patch+json", "If-Match": f'W/"{patient.meta.versionId}"'},
    lambda: client.execute(f"Patient/{patient.id}", method="patch", data=ops),
)
report("patch", id=patched["id"], versionId=patched["meta"]["versionId"], phone=patched["telecom"][0]["value"])
with_headers({"If-Match": f'W/"{patched["meta"]["versionId"]}"'}, lambda: patient.patch(birthDate="1990-04-02"))
report("merge-patch", id=patient.id, versionId=patient.meta.versionId, phone=patient.telecom[0].value)

# 5. Conditional update: PUT Patient?identifier=… creates when nothing matches (201) and updates the one match
# (200, If-Match as for any update); more than one match is 412.
other_mrn = uuid.uuid4().hex[:12]
by_mrn = client.resources("Patient").search(identifier=f"{MRN}|{other_mrn}")
body = {"identifier": [{"system": MRN, "value": other_mrn}], "name": [{"family": family, "given": ["Grace"]}]}
made, made_created = by_mrn.update(client.resource("Patient", **body))
body["gender"] = "female"
changed, changed_created = with_headers(
    {"If-Match": f'W/"{made.meta.versionId}"'}, lambda: by_mrn.update(client.resource("Patient", **body))
)
report(
    "conditional-update",
    ids=[made.id, changed.id],
    created=[made_created, changed_created],
    versionId=changed.meta.versionId,
    mrn=other_mrn,
)

# 6. Conditional delete: DELETE Patient?identifier=… removes the one match; reading it afterwards is 410 (fhirpy:
# ResourceNotFound, as for 404).
by_mrn.delete()
try:
    client.reference("Patient", made.id).to_resource()
    report("conditional-delete", id=made.id, gone=False)
except ResourceNotFound:
    report("conditional-delete", id=made.id, gone=True)

# 7. A transaction (all or nothing): a Practitioner, a Patient, the Patient's care team and first Encounter, which
# refer to the others by their urn:uuid fullUrls; carevault stores each reference as Type/{new id}. The Patient
# entry is a conditional create (ifNoneExist).
practitioner_url, patient_url = f"urn:uuid:{uuid.uuid4()}", f"urn:uuid:{uuid.uuid4()}"
tx_mrn = uuid.uuid4().hex[:12]
transaction = {
    "resourceType": "Bundle",
    "type": "transaction",
    "entry": [
        {
            "fullUrl": practitioner_url,
            "resource": {"resourceType": "Practitioner", "name": [{"family": "Osler", "given": ["William"]}]},
            "request": {"method": "POST", "url": "Practitioner"},
        },
        {
            "fullUrl": patient_url,
            "resource": {
                "resourceType": "Patient",
                "identifier": [{"system": MRN, "value": tx_mrn}],
                "name": [{"family": family, "given": ["Edith"]}],
            },
            "request": {"method": "POST", "url": "Patient", "ifNoneExist": f"identifier={MRN}|{tx_mrn}"},
        },
        {
            "fullUrl": f"urn:uuid:{uuid.uuid4()}",
            "resource": {
                "resourceType": "CareTeam",
                "status": "active",
                "subject": {"reference": patient_url},
                "participant": [{"member": {"reference": practitioner_url}}],
            },
            "request": {"method": "POST", "url": "CareTeam"},
        },
        {
            "fullUrl": f"urn:uuid:{uuid.uuid4()}",
            "resource": {
                "resourceType": "Encounter",
                "status": "planned",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                "subject": {"reference": patient_url},
                "participant": [{"individual": {"reference": practitioner_url}}],
                "period": {"start": "2026-12-04T09:00:00Z"},
            },
            "request": {"method": "POST", "url": "Encounter"},
        },
    ],
}
result = client.execute("/", method="post", data=transaction)  # POST {BASE}/
report(
    "transaction",
    type=result["type"],
    status=[e["response"]["status"] for e in result["entry"]],
    location=[e["response"]["location"] for e in result["entry"]],
    etag=[e["response"].get("etag") for e in result["entry"]],
    mrn=tx_mrn,
)

# 8. A batch: each entry on its own. Front desk may not write an Observation: that entry fails, the others don't.
batch = {
    "resourceType": "Bundle",
    "type": "batch",
    "entry": [
        {
            "resource": {"resourceType": "Patient", "name": [{"family": family, "given": ["Mary"]}]},
            "request": {"method": "POST", "url": "Patient"},
        },
        {"request": {"method": "GET", "url": f"Patient/{first.id}"}},
        {
            "resource": {
                "resourceType": "Observation",
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                "subject": {"reference": f"Patient/{first.id}"},
                "valueQuantity": {"value": 72, "unit": "/min"},
            },
            "request": {"method": "POST", "url": "Observation"},
        },
    ],
}
result = client.execute("/", method="post", data=batch)
report(
    "batch",
    type=result["type"],
    status=[e["response"]["status"] for e in result["entry"]],
    location=[e["response"].get("location") for e in result["entry"]],
)
