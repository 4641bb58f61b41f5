// carevault writes with fhir-kit-client 2.x (npm): conditional create (If-None-Exist), update with If-Match, JSON
// Patch, conditional update and delete, a transaction and a batch Bundle, as a front-desk service client.
//
// Environment: CAREVAULT_FHIR_BASE (default https://127.0.0.1:8443/fhir), CAREVAULT_CLIENT_ID and
// CAREVAULT_CLIENT_SECRET (from `carevault users add --service --role front_desk`),
// NODE_EXTRA_CA_CERTS=data/tls/cert.pem (the certificate to trust; Node reads it at start). Each step prints one
// JSON line.
import { randomUUID } from "node:crypto";
import { Client } from "fhir-kit-client";

const BASE = process.env.CAREVAULT_FHIR_BASE ?? "https://127.0.0.1:8443/fhir";
const MRN = "https://carevault.example/fhir/sid/mrn"; // a medical record number system (synthetic)
const report = (step, fields = {}) => console.log(JSON.stringify({ step, ...fields }));
const statusOf = (result) => Client.httpFor(result).response.status;
const etagOf = (result) => Client.httpFor(result).response.headers.get("etag");

// 1. A token (as in the first fhir-kit-client example).
const client = new Client({ baseUrl: BASE });
const { tokenUrl } = await client.smartAuthMetadata();
const basic = Buffer.from(`${process.env.CAREVAULT_CLIENT_ID}:${process.env.CAREVAULT_CLIENT_SECRET}`).toString("base64");
const tokenResponse = await fetch(tokenUrl, {
  method: "POST",
  headers: { authorization: `Basic ${basic}`, "content-type": "application/x-www-form-urlencoded" },
  body: new URLSearchParams({ grant_type: "client_credentials" }),
});
if (!tokenResponse.ok) throw new Error(`token endpoint: HTTP ${tokenResponse.status}`);
const token = await tokenResponse.json();
client.bearerToken = token.access_token;
report("token", { expires_in: token.expires_in });

// 2. Conditional create: with If-None-Exist the second create finds the first patient (200) instead of making a
// duplicate (201).
const family = `FhirKitW-${randomUUID().slice(0, 8)}`;
const mrn = randomUUID().slice(0, 12);
const register = (given) =>
  client.create({
    resourceType: "Patient",
    body: {
      resourceType: "Patient",
      identifier: [{ system: MRN, value: mrn }],
      name: [{ family, given: [given] }],
      gender: "female",
      birthDate: "1990-04-01",
      telecom: [{ system: "phone", value: "555-0100", use: "home" }],
    },
    options: { headers: { "If-None-Exist": new URLSearchParams({ identifier: `${MRN}|${mrn}` }).toString() } },
  });
const first = await register("Ada");
const again = await register("Ada");
report("get-or-create", { ids: [first.id, again.id], created: [statusOf(first) === 201, statusOf(again) === 201], family, mrn });

// 3. Update with If-Match (the ETag you read); a stale one is 412.
const read = await client.read({ resourceType: "Patient", id: first.id });
const etag = etagOf(read);
read.address = [{ city: "Springfield", state: "IL", postalCode: "62701" }];
const updated = await client.update({ resourceType: "Patient", id: read.id, body: read, options: { headers: { "If-Match": etag } } });
report("update", { id: updated.id, versionId: updated.meta.versionId });
try {
  await client.update({ resourceType: "Patient", id: read.id, body: read, options: { headers: { "If-Match": etag } } });
  report("stale-update", { status: 200 });
} catch (e) {
  report("stale-update", { status: e.response.status, outcome: e.response.data.resourceType });
}

// 4. Patch: patch() sends JSON Patch (application/json-patch+json); If-Match as for PUT: a stale one is 412,
// none is 428.
const ops = [{ op: "replace", path: "/telecom/0/value", value: "555-0199" }];
const patched = await client.patch({
  resourceType: "Patient",
  id: first.id,
  jsonPatch: ops,
  options: { headers: { "If-Match": etagOf(updated) } },
});
report("patch", { id: patched.id, versionId: patched.meta.versionId, phone: patched.telecom[0].value });
try {
  await client.patch({ resourceType: "Patient", id: first.id, jsonPatch: [{ op: "replace", path: "/gender", value: "male" }], options: { headers: { "If-Match": etag } } });
  report("stale-patch", { status: 200 });
} catch (e) {
  report("stale-patch", { status: e.response.status, outcome: e.response.data.resourceType });
}
try {
  await client.patch({ resourceType: "Patient", id: first.id, jsonPatch: [{ op: "replace", path: "/gender", value: "male" }] });
  report("unversioned-patch", { status: 200 });
} catch (e) {
  // fhir.require_if_match (default true): no If-Match, no write
  report("unversioned-patch", { status: e.response.status, outcome: e.response.data.resourceType });
}

// 5. Conditional update: update({searchParams}) is PUT Patient?identifier=…: it creates when nothing matches (201)
// and updates the one match (200, If-Match as for any update); more than one match is 412.
const otherMrn = randomUUID().slice(0, 12);
const searchParams = { identifier: `${MRN}|${otherMrn}` };
const body = { resourceType: "Patient", identifier: [{ system: MRN, value: otherMrn }], name: [{ family, given: ["Grace"] }] };
const made = await client.update({ resourceType: "Patient", searchParams, body });
const changed = await client.update({
  resourceType: "Patient",
  searchParams,
  body: { ...body, gender: "female" },
  options: { headers: { "If-Match": etagOf(made) } },
});
report("conditional-update", {
  ids: [made.id, changed.id],
  created: [statusOf(made) === 201, statusOf(changed) === 201],
  versionId: changed.meta.versionId,
  mrn: otherMrn,
});

// 6. Conditional delete: fhir-kit-client has no method for it; request() sends DELETE Patient?identifier=….
// Reading the deleted patient afterwards is 410.
const deleted = await client.request(`Patient?${new URLSearchParams(searchParams)}`, { method: "DELETE" });
try {
  await client.read({ resourceType: "Patient", id: made.id });
  report("conditional-delete", { id: made.id, status: statusOf(deleted), gone: false });
} catch (e) {
  report("conditional-delete", { id: made.id, status: statusOf(deleted), gone: e.response.status === 410 });
}

// 7. A transaction (all or nothing): a Patient and its Encounter, which refers to the Patient by its urn:uuid
// fullUrl; carevault stores the reference as Patient/{new id}. The Patient entry is a conditional create
// (ifNoneExist): sent twice, the second transaction finds that patient and links a second Encounter to it.
const txMrn = randomUUID().slice(0, 12);
const visit = (start) => {
  const patientUrl = `urn:uuid:${randomUUID()}`;
  return {
    resourceType: "Bundle",
    type: "transaction",
    entry: [
      {
        fullUrl: patientUrl,
        resource: { resourceType: "Patient", identifier: [{ system: MRN, value: txMrn }], name: [{ family, given: ["Edith"] }] },
        request: { method: "POST", url: "Patient", ifNoneExist: `identifier=${MRN}|${txMrn}` },
      },
      {
        fullUrl: `urn:uuid:${randomUUID()}`,
        resource: {
          resourceType: "Encounter",
          status: "planned",
          class: { system: "http://terminology.hl7.org/CodeSystem/v3-ActCode", code: "AMB" },
          subject: { reference: patientUrl },
          period: { start },
        },
        request: { method: "POST", url: "Encounter" },
      },
    ],
  };
};
const entries = (bundle) => ({
  type: bundle.type,
  status: bundle.entry.map((e) => e.response.status),
  location: bundle.entry.map((e) => e.response.location ?? null),
  etag: bundle.entry.map((e) => e.response.etag ?? null),
});
const tx = await client.transaction({ body: visit("2026-12-04T09:00:00Z") }); // POST {BASE}/
report("transaction", { ...entries(tx), mrn: txMrn });
const tx2 = await client.transaction({ body: visit("2026-12-11T09:00:00Z") });
report("transaction-again", entries(tx2));

// 8. A batch: each entry on its own. Front desk may not write an Observation: that entry fails, the others don't.
const result = await client.batch({
  body: {
    resourceType: "Bundle",
    type: "batch",
    entry: [
      { resource: { resourceType: "Patient", name: [{ family, given: ["Mary"] }] }, request: { method: "POST", url: "Patient" } },
      { request: { method: "GET", url: `Patient/${first.id}` } },
      {
        resource: {
          resourceType: "Observation",
          status: "final",
          code: { coding: [{ system: "http://loinc.org", code: "8867-4" }] },
          subject: { reference: `Patient/${first.id}` },
          valueQuantity: { value: 72, unit: "/min" },
        },
        request: { method: "POST", url: "Observation" },
      },
    ],
  },
});
report("batch", { type: result.type, status: result.entry.map((e) => e.response.status), location: result.entry.map((e) => e.response.location ?? null) });
