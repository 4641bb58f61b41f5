#!/usr/bin/env python3
"""SMART standalone launch round trip against a running carevault (docs/benchmarks.md, "SMART launch").

Times each step of the authorization-code flow as a browser and a public app make it, over one kept-alive
HTTPS connection per step kind: GET /auth/authorize (sign-in page), POST /auth/authorize/login (argon2id
password check, consent page with the patient picker: a search as the user), POST /auth/authorize/consent (the
chosen patient read as the user, the code), POST /auth/token (PKCE, a session, the access and ID tokens), and
a first FHIR read with the new token. Prints one JSON line per round and a summary with medians.

    python3 benches/smart/roundtrip.py --base https://127.0.0.1:8443 --ca data/tls/cert.pem \
        --client-id ID --username demo-clinician --password PW [--rounds 30]

Standard library only. The app must be registered public with redirect URI http://127.0.0.1:9/cb and the
scopes "launch/patient openid fhirUser patient/*.rs" (benches/smart/run.sh does all of it).
"""

import argparse
import base64
import hashlib
import http.client
import json
import re
import secrets
import ssl
import statistics
import sys
import time
import urllib.parse

REDIRECT = "http://127.0.0.1:9/cb"
SCOPE = "launch/patient openid fhirUser patient/*.rs"


def hidden(html, name):
    m = re.search(r'name="%s" value="([^"]*)"' % re.escape(name), html)
    return m.group(1) if m else None


class Conn:
    def __init__(self, base, ctx):
        u = urllib.parse.urlsplit(base)
        self.c = http.client.HTTPSConnection(u.hostname, u.port or 443, context=ctx, timeout=30)

    def request(self, method, path, body=None, headers=None):
        h = dict(headers or {})
        if body is not None:
            body = urllib.parse.urlencode(body)
            h["Content-Type"] = "application/x-www-form-urlencoded"
        start = time.perf_counter()
        self.c.request(method, path, body=body, headers=h)
        r = self.c.getresponse()
        data = r.read()
        return r.status, r.getheader("Location"), data.decode("utf-8", "replace"), time.perf_counter() - start


def one_round(conn, base, args):
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    q = urllib.parse.urlencode({
        "response_type": "code", "client_id": args.client_id, "redirect_uri": REDIRECT, "scope": SCOPE,
        "state": "bench", "aud": base + "/fhir", "code_challenge": challenge, "code_challenge_method": "S256",
    })
    times = {}
    st, _, html, times["authorize"] = conn.request("GET", "/auth/authorize?" + q)
    assert st == 200, ("authorize", st)
    flow = hidden(html, "flow")
    st, _, html, times["sign_in"] = conn.request(
        "POST", "/auth/authorize/login",
        {"flow": flow, "username": args.username, "password": args.password, "totp": ""})
    assert st == 200 and 'form id="consent"' in html, ("sign-in", st)
    patient = re.search(r'<option value="([^"]+)"', html)
    assert patient, "the picker lists the user's patients"
    st, location, _, times["consent"] = conn.request("POST", "/auth/authorize/consent", {
        "flow": hidden(html, "flow"), "consent": hidden(html, "consent"), "decision": "approve",
        "patient": patient.group(1)})
    assert st == 303 and location.startswith(REDIRECT), ("consent", st)
    code = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query)["code"][0]
    st, _, body, times["token"] = conn.request("POST", "/auth/token", {
        "grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT, "client_id": args.client_id,
        "code_verifier": verifier})
    assert st == 200, ("token", st, body[:200])
    tokens = json.loads(body)
    st, _, _, times["first_read"] = conn.request(
        "GET", "/fhir/Patient/" + tokens["patient"],
        headers={"Authorization": "Bearer " + tokens["access_token"], "Accept": "application/fhir+json"})
    assert st == 200, ("read", st)
    times["launch"] = times["authorize"] + times["sign_in"] + times["consent"] + times["token"]
    return times


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--client-id", required=True)
    p.add_argument("--username", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args()
    ctx = ssl.create_default_context(cafile=args.ca)
    conn = Conn(args.base, ctx)
    rounds = []
    for i in range(args.rounds):
        t = one_round(conn, args.base, args)
        rounds.append(t)
        print(json.dumps({"round": i, **{k: round(v * 1000, 2) for k, v in t.items()}}))
    summary = {}
    for k in rounds[0]:
        values = sorted(r[k] * 1000 for r in rounds)
        summary[k] = {"median_ms": round(statistics.median(values), 2),
                      "p90_ms": round(values[int(0.9 * (len(values) - 1))], 2)}
    print(json.dumps({"summary": summary, "rounds": len(rounds)}))


if __name__ == "__main__":
    sys.exit(main())
