"""carevault with fhirclient 4.x (SMART on FHIR client-py): sign in as a service client, then create, read,
search, update and page.

Environment: CAREVAULT_FHIR_BASE (default https://127.0.0.1:8443/fhir), CAREVAULT_CLIENT_ID and
CAREVAULT_CLIENT_SECRET (from `carevault users add --service`), CAREVAULT_CA (the certificate to trust,
default data/tls/cert.pem). Each step prints one JSON line.
"""

import json
import os
import uuid

from fhirclient import client
from fhirclient.models.contactpoint import ContactPoint
from fhirclient.models.patient import Patient
from fhirclient.server import FHIRNotFoundException
from requests import HTTPError

BASE = os.environ.get("CAREVAULT_FHIR_BASE", "https://127.0.0.1:8443/fhir")
CA = os.environ.get("CAREVAULT_CA", "data/tls/cert.pem")  # keep TLS verification on


def report(step, **fields):
    print(json.dumps({"step": step, **fields}), flush=True)


# 1. A token: fhirclient finds the token endpoint in the CapabilityStatement (oauth-uris) and, with an app
# secret, asks for client_credentials with HTTP Basic. A service client acts in its account's role.
smart = client.FHIRClient(
    settings={
        "app_id": os.environ["CAREVAULT_CLIENT_ID"],
        "app_secret": os.environ["CAREVAULT_CLIENT_SECRET"],
        "api_base": BASE,
    }
)
smart.server.session.verify = CA
smart.server.session.trust_env = False  # else REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE (and proxy variables) win
smart.prepare()  # reads /fhir/metadata
smart.wants_patient = False  # no launch/patient: this is no SMART launch
smart.authorize()  # access tokens live 5 minutes: authorize() again when one expires
report("token", ready=smart.ready)
server = smart.server

# 2. Create (synthetic data only) and read back.
family = f"Fhirclient-{uuid.uuid4().hex[:8]}"
patient = Patient({"name": [{"family": family, "given": ["Ada"]}], "gender": "female", "birthDate": "1990-04-01"})
created = Patient(patient.create(server))
report("create", id=created.id, versionId=created.meta.versionId, family=family)

read = Patient.read(created.id, server)
report("read", id=read.id, versionId=read.meta.versionId, family=read.name[0].family)

# 3. Search by family name.
found = list(Patient.where(struct={"family": family}).perform_resources_iter(server))
report("search", ids=[p.id for p in found])


# 4. Update with If-Match: carevault answers 428 without it and 412 when someone else wrote first.
# fhirclient's update() takes no headers; its requests session carries If-Match for that one call.
def update_if_match(resource, version):
    server.session.headers["If-Match"] = f'W/"{version}"'
    try:
        return type(resource)(resource.update(server))
    finally:
        del server.session.headers["If-Match"]


read.telecom = [ContactPoint({"system": "phone", "value": "555-0100", "use": "mobile"})]
updated = update_if_match(read, read.meta.versionId)
report("update", id=updated.id, versionId=updated.meta.versionId)

try:
    update_if_match(read, "1")  # stale: the resource is at version 2 now
    report("stale-update", status=200)
except HTTPError as e:
    report("stale-update", status=e.response.status_code, outcome=e.response.json()["resourceType"])

# 5. Paging: perform_iter() yields one Bundle per page, following each `next` link (an opaque cursor).
for given in ["Grace", "Edith"]:
    Patient({"name": [{"family": family, "given": [given]}], "gender": "female"}).create(server)
pages = list(Patient.where(struct={"family": family, "_count": "2"}).perform_iter(server))
paged = [entry.resource.id for page in pages for entry in page.entry or []]
report("paging", count=2, pages=len(pages), ids=paged)

# 6. Errors are OperationOutcomes: an unknown id (or one you may not see) is 404.
try:
    Patient.read(str(uuid.uuid4()), server)
    report("not-found", status=200)
except FHIRNotFoundException as e:
    outcome = e.response.json()
    report("not-found", status=404, resourceType=outcome["resourceType"], code=outcome["issue"][0]["code"])
