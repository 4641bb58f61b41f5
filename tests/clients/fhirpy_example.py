"""carevault with fhirpy 2.x: sign in as a service client, then create, read, search, update and page.

Environment: CAREVAULT_FHIR_BASE (default https://127.0.0.1:8443/fhir), CAREVAULT_CLIENT_ID and
CAREVAULT_CLIENT_SECRET (from `carevault users add --service`), CAREVAULT_CA (the certificate to trust,
default data/tls/cert.pem). Each step prints one JSON line.
"""

import json
import os
import uuid

import requests
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import MultipleResourcesFound, ResourceNotFound

BASE = os.environ.get("CAREVAULT_FHIR_BASE", "https://127.0.0.1:8443/fhir")
CA = os.environ.get("CAREVAULT_CA", "data/tls/cert.pem")  # keep TLS verification on


def report(step, **fields):
    print(json.dumps({"step": step, **fields}), flush=True)


# 1. A token: SMART discovery names the token endpoint; a service client authenticates with HTTP Basic.
smart = requests.get(f"{BASE}/.well-known/smart-configuration", verify=CA, timeout=10).json()
token = requests.post(
    smart["token_endpoint"],
    data={"grant_type": "client_credentials"},
    auth=(os.environ["CAREVAULT_CLIENT_ID"], os.environ["CAREVAULT_CLIENT_SECRET"]),
    verify=CA,
    timeout=10,
)
token.raise_for_status()
access = token.json()["access_token"]  # lives 5 minutes: ask again when it expires
report("token", expires_in=token.json()["expires_in"])

client = SyncFHIRClient(BASE, authorization=f"Bearer {access}", requests_config={"verify": CA, "timeout": 10})

# 2. Create (synthetic data only) and read back.
family = f"Fhirpy-{uuid.uuid4().hex[:8]}"
patient = client.resource("Patient", name=[{"family": family, "given": ["Ada"]}], gender="female", birthDate="1990-04-01")
patient.save()
report("create", id=patient.id, versionId=patient.meta.versionId, family=family)

read = client.reference("Patient", patient.id).to_resource()
report("read", id=read.id, versionId=read.meta.versionId, family=read.name[0].family)

# 3. Search by family name.
found = client.resources("Patient").search(family=family).fetch()
report("search", ids=[p.id for p in found])


# 4. Update with If-Match: carevault answers 428 without it and 412 when someone else wrote first. fhirpy's
# save() takes no per-request headers, so If-Match goes in the client's extra headers for that one call.
def save_if_match(resource, version):
    client.extra_headers = {"If-Match": f'W/"{version}"'}
    try:
        resource.save()
    finally:
        client.extra_headers = None


read.telecom = [{"system": "phone", "value": "555-0100", "use": "mobile"}]
save_if_match(read, read.meta.versionId)
report("update", id=read.id, versionId=read.meta.versionId)

try:
    save_if_match(read, "1")  # stale: the resource is at version 2 now
    report("stale-update", status=200)
except MultipleResourcesFound as e:  # fhirpy's name for any 412
    report("stale-update", status=412, outcome=json.loads(str(e))["resourceType"])

# 5. Paging: iterating a search set follows each `next` link (an opaque cursor) until there is none.
for given in ["Grace", "Edith"]:
    client.resource("Patient", name=[{"family": family, "given": [given]}], gender="female").save()
paged = [p.id for p in client.resources("Patient").search(family=family).limit(2)]
report("paging", count=2, ids=paged)

# 6. Errors are OperationOutcomes: an unknown id (or one you may not see) is 404.
try:
    client.reference("Patient", str(uuid.uuid4())).to_resource()
    report("not-found", status=200)
except ResourceNotFound as e:  # 404 and 410
    outcome = json.loads(str(e))
    report("not-found", status=404, resourceType=outcome["resourceType"], code=outcome["issue"][0]["code"])
