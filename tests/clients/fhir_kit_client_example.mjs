// carevault with fhir-kit-client 2.x (npm): sign in as a service client, then create, read, search, update and page.
//
// Environment: CAREVAULT_FHIR_BASE (default https://127.0.0.1:8443/fhir), CAREVAULT_CLIENT_ID and
// CAREVAULT_CLIENT_SECRET (from `carevault users add --service`), NODE_EXTRA_CA_CERTS=data/tls/cert.pem (the
// certificate to trust; Node reads it at start). Each step prints one JSON line.
import { randomUUID } from "node:crypto";
import { Client } from "fhir-kit-client";

const BASE = process.env.CAREVAULT_FHIR_BASE ?? "https://127.0.0.1:8443/fhir";
const report = (step, fields = {}) => console.log(JSON.stringify({ step, ...fields }));

// 1. A token: SMART discovery names the token endpoint; a service client authenticates with HTTP Basic.
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
client.bearerToken = token.access_token; // lives 5 minutes: ask again when it expires
report("token", { expires_in: token.expires_in });

// 2. Create (synthetic data only) and read back; the ETag is the version.
const family = `FhirKit-${randomUUID().slice(0, 8)}`;
const created = await client.create({
  resourceType: "Patient",
  body: { resourceType: "Patient", name: [{ family, given: ["Ada"] }], gender: "female", birthDate: "1990-04-01" },
});
report("create", { id: created.id, versionId: created.meta.versionId, family });

const read = await client.read({ resourceType: "Patient", id: created.id });
const etag = Client.httpFor(read).response.headers.get("etag"); // W/"1"
report("read", { id: read.id, versionId: read.meta.versionId, family: read.name[0].family, etag });

// 3. Search by family name.
const found = await client.search({ resourceType: "Patient", searchParams: { family } });
report("search", { ids: (found.entry ?? []).map((e) => e.resource.id) });

// 4. Update with If-Match: carevault answers 428 without it and 412 when someone else wrote first.
read.telecom = [{ system: "phone", value: "555-0100", use: "mobile" }];
const updated = await client.update({
  resourceType: "Patient",
  id: read.id,
  body: read,
  options: { headers: { "If-Match": etag } },
});
report("update", { id: updated.id, versionId: updated.meta.versionId });

try {
  await client.update({ resourceType: "Patient", id: read.id, body: read, options: { headers: { "If-Match": etag } } });
  report("stale-update", { status: 200 });
} catch (e) {
  // etag is stale now: the resource is at version 2
  report("stale-update", { status: e.response.status, outcome: e.response.data.resourceType });
}

// 5. Paging: follow each `next` link (an opaque cursor) with nextPage() until there is none.
for (const given of ["Grace", "Edith"]) {
  await client.create({ resourceType: "Patient", body: { resourceType: "Patient", name: [{ family, given: [given] }] } });
}
const paged = [];
let pages = 0;
let page = await client.search({ resourceType: "Patient", searchParams: { family, _count: 2 } });
while (page) {
  pages += 1;
  paged.push(...(page.entry ?? []).map((e) => e.resource.id));
  page = await client.nextPage({ bundle: page }); // undefined after the last page
}
report("paging", { count: 2, pages, ids: paged });

// 6. Errors are OperationOutcomes: an unknown id (or one you may not see) is 404.
try {
  await client.read({ resourceType: "Patient", id: randomUUID() });
  report("not-found", { status: 200 });
} catch (e) {
  const outcome = e.response.data;
  report("not-found", { status: e.response.status, resourceType: outcome.resourceType, code: outcome.issue[0].code });
}
