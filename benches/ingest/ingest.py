#!/usr/bin/env python3
"""Ingest benchmark driver (docs/benchmarks.md, "Ingest"): the same clinical entries loaded into a running
carevault by transaction Bundles (`POST /fhir`) or one by one (`POST /fhir/{type}`), or written out for
`carevault import` (NDJSON) and for raw PostgreSQL (COPY rows).

    ingest.py setup  --base URL --ca CERT --username U --password-file F --patients N      > setup.json
    ingest.py run    --base URL --ca CERT --username U --password-file F --setup setup.json \
                     --mode transaction|single --entries N [--batch 100] [--concurrency 4]   (one JSON line)
    ingest.py ndjson --setup setup.json --entries N                                          > entries.ndjson
    ingest.py copy   --setup setup.json --entries N                                          > rows.tsv

The entries: units of one Encounter, 8 vital-sign Observations and 1 Condition (10 resources, ~0.6 KB of JSON
each, 5 to 9 PHI elements), each unit for a random patient of the setup (all on the clinician's care team).
In a transaction the unit's Observations and Condition reference its Encounter by `urn:uuid:`; posted one by
one, the Encounter is created first and the others name its id. Standard library only.
"""

import argparse
import http.client
import json
import random
import ssl
import sys
import threading
import time
import urllib.parse
import uuid

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
VITALS = [
    ("8867-4", "Heart rate", "/min"),
    ("8310-5", "Body temperature", "Cel"),
    ("29463-7", "Body weight", "kg"),
    ("8302-2", "Body height", "cm"),
    ("39156-5", "Body mass index", "kg/m2"),
    ("9279-1", "Respiratory rate", "/min"),
    ("2708-6", "Oxygen saturation", "%"),
    ("8480-6", "Systolic blood pressure", "mm[Hg]"),
]


class Client:
    def __init__(self, base, ca):
        u = urllib.parse.urlsplit(base)
        self.host, self.port = u.hostname, u.port or 443
        self.ctx = ssl.create_default_context(cafile=ca)
        self.ctx.check_hostname = False  # the generated certificate names localhost; the CA is still checked
        self.conn = None
        self.token = None

    def request(self, method, path, body=None, content_type="application/fhir+json"):
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=300)
            headers = {"content-type": content_type, "accept": "application/fhir+json"}
            if self.token:
                headers["authorization"] = "Bearer " + self.token
            data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
            try:
                self.conn.request(method, path, body=data, headers=headers)
                r = self.conn.getresponse()
                text = r.read()
                return r.status, (json.loads(text) if text else None)
            except (http.client.HTTPException, OSError):  # a kept-alive connection the server closed
                self.conn = None
                if attempt:
                    raise

    def login(self, username, password):
        s, b = self.request("POST", "/auth/login", {"username": username, "password": password},
                            content_type="application/json")
        assert s == 200, (s, b)
        self.token = b["access_token"]


def ref(t, i):
    return {"reference": f"{t}/{i}"}


def unit(rng, patient, practitioner, encounter_ref):
    """One visit: an Encounter and the 9 resources that reference it (through `encounter_ref`)."""
    start = f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{rng.randint(8, 17):02d}:00:00Z"
    enc = {
        "resourceType": "Encounter", "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB", "display": "ambulatory"},
        "type": [{"coding": [{"system": SNOMED, "code": "185349003", "display": "Encounter for check up"}]}],
        "subject": ref("Patient", patient), "participant": [{"individual": ref("Practitioner", practitioner)}],
        "period": {"start": start, "end": start}, "reasonCode": [{"text": "Routine check-up"}],
    }
    rest = []
    for code, display, unit_ in VITALS:
        rest.append({
            "resourceType": "Observation", "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": "vital-signs"}]}],
            "code": {"coding": [{"system": LOINC, "code": code, "display": display}], "text": display},
            "subject": ref("Patient", patient), "encounter": {"reference": encounter_ref},
            "effectiveDateTime": start, "performer": [ref("Practitioner", practitioner)],
            "valueQuantity": {"value": round(rng.uniform(20, 120), 1), "unit": unit_,
                              "system": "http://unitsofmeasure.org", "code": unit_},
        })
    rest.append({
        "resourceType": "Condition",
        "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                       "code": "active"}]},
        "code": {"coding": [{"system": SNOMED, "code": "38341003", "display": "Hypertension"}], "text": "Hypertension"},
        "subject": ref("Patient", patient), "encounter": {"reference": encounter_ref}, "recordedDate": start,
    })
    return enc, rest


def units(setup, entries, seed):
    rng = random.Random(seed)
    for _ in range(max(1, entries // 10)):
        yield rng, rng.choice(setup["patients"]), setup["practitioner"]


def transaction_entries(setup, entries, seed):
    out = []
    for rng, patient, practitioner in units(setup, entries, seed):
        urn = f"urn:uuid:{uuid.UUID(int=rng.getrandbits(128), version=4)}"
        enc, rest = unit(rng, patient, practitioner, urn)
        out.append({"fullUrl": urn, "resource": enc, "request": {"method": "POST", "url": "Encounter"}})
        out += [{"resource": r, "request": {"method": "POST", "url": r["resourceType"]}} for r in rest]
    return out


def cmd_setup(a):
    c = Client(a.base, a.ca)
    c.login(a.username, open(a.password_file).read().strip())
    s, pr = c.request("POST", "/fhir/Practitioner",
                      {"resourceType": "Practitioner", "name": [{"family": "Ingestbench", "given": ["Pat"]}]})
    assert s == 201, (s, pr)
    patients = []
    for i in range(a.patients):
        s, p = c.request("POST", "/fhir/Patient", {"resourceType": "Patient", "gender": "other",
                                                   "name": [{"family": f"Ingest-{i}", "given": ["Bench"]}],
                                                   "birthDate": "1970-01-01"})
        assert s == 201, (s, p)
        s, ct = c.request("POST", "/fhir/CareTeam", {"resourceType": "CareTeam", "status": "active",
                                                     "subject": ref("Patient", p["id"]),
                                                     "participant": [{"member": ref("Practitioner", pr["id"])}]})
        assert s == 201, (s, ct)
        patients.append(p["id"])
    print(json.dumps({"practitioner": pr["id"], "patients": patients}))


def run_parallel(a, jobs, work):
    """Runs `work(client, job)` over `jobs` on `a.concurrency` connections; returns (done, errors, seconds)."""
    password = open(a.password_file).read().strip()
    clients = []
    for _ in range(a.concurrency):
        c = Client(a.base, a.ca)
        c.login(a.username, password)
        clients.append(c)
    lock = threading.Lock()
    queue = list(reversed(jobs))
    counts = {"done": 0, "errors": 0, "first_error": None}

    def worker(c):
        while True:
            with lock:
                if not queue:
                    return
                job = queue.pop()
            try:
                ok, n, err = work(c, job)
            except Exception as e:  # counted, not fatal: the summary shows errors
                ok, n, err = False, 10, f"{type(e).__name__}"
            with lock:
                counts["done" if ok else "errors"] += n
                if err and not counts["first_error"]:
                    counts["first_error"] = err

    threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counts, time.perf_counter() - t0


def cmd_run(a):
    setup = json.load(open(a.setup))
    if a.mode == "transaction":
        entries = transaction_entries(setup, a.entries, a.seed)
        # Whole units per Bundle (a unit's references stay inside its transaction).
        per = max(10, a.batch - a.batch % 10)
        jobs = [entries[i:i + per] for i in range(0, len(entries), per)]

        def work(c, chunk):
            s, b = c.request("POST", "/fhir", {"resourceType": "Bundle", "type": "transaction", "entry": chunk})
            ok = s == 200 and all(e["response"]["status"].startswith("201") for e in b.get("entry", []))
            return ok, len(chunk), None if ok else f"{s}: {json.dumps(b)[:300]}"
    else:
        jobs = [unit(rng, p, pr, "urn:pending") for rng, p, pr in units(setup, a.entries, a.seed)]

        def work(c, job):
            enc, rest = job
            s, e = c.request("POST", "/fhir/Encounter", enc)
            if s != 201:
                return False, 10, f"{s}: {json.dumps(e)[:300]}"
            n = 1
            for r in rest:
                r = dict(r, encounter=ref("Encounter", e["id"]))
                s, b = c.request("POST", "/fhir/" + r["resourceType"], r)
                if s != 201:
                    return False, 10 - n, f"{s}: {json.dumps(b)[:300]}"
                n += 1
            return True, n, None
    counts, secs = run_parallel(a, jobs, work)
    print(json.dumps({"mode": a.mode, "resources": counts["done"], "errors": counts["errors"],
                      "first_error": counts["first_error"], "secs": round(secs, 3),
                      "rps": round(counts["done"] / secs, 1), "batch": a.batch if a.mode == "transaction" else 1,
                      "concurrency": a.concurrency}))


def resolved(setup, entries, seed):
    """The entries as stored resources: ids assigned, the unit's Encounter referenced by id."""
    out = []
    for e in transaction_entries(setup, entries, seed):
        r = dict(e["resource"], id=str(uuid.uuid4()))
        if "fullUrl" in e:
            enc_id = r["id"]
        else:
            r["encounter"] = ref("Encounter", enc_id)
        out.append(r)
    return out


def cmd_ndjson(a):
    for e in transaction_entries(json.load(open(a.setup)), a.entries, a.seed):
        r = dict(e["resource"])
        if "fullUrl" in e:
            r["id"] = e["fullUrl"].split(":")[-1]
            enc = "Encounter/" + r["id"]
        else:
            r["encounter"] = {"reference": enc}
        sys.stdout.write(json.dumps(r) + "\n")


def cmd_copy(a):
    for r in resolved(json.load(open(a.setup)), a.entries, a.seed):
        patient = r["subject"]["reference"].split("/")[1]
        doc = json.dumps(r).replace("\\", "\\\\")
        sys.stdout.write(f"{r['resourceType']}\t{r['id']}\t{patient}\t{doc}\n")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("setup", "run", "ndjson", "copy"):
        p = sub.add_parser(name)
        if name in ("setup", "run"):
            p.add_argument("--base", required=True)
            p.add_argument("--ca", required=True)
            p.add_argument("--username", required=True)
            p.add_argument("--password-file", required=True)
        if name == "setup":
            p.add_argument("--patients", type=int, default=20)
        else:
            p.add_argument("--setup", required=True)
            p.add_argument("--entries", type=int, default=2000)
            p.add_argument("--seed", type=int, default=1)
        if name == "run":
            p.add_argument("--mode", choices=["transaction", "single"], required=True)
            p.add_argument("--batch", type=int, default=100)
            p.add_argument("--concurrency", type=int, default=4)
    a = ap.parse_args()
    {"setup": cmd_setup, "run": cmd_run, "ndjson": cmd_ndjson, "copy": cmd_copy}[a.cmd](a)


if __name__ == "__main__":
    main()
