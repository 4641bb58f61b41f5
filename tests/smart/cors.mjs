#!/usr/bin/env node
// CORS check in a real browser (headless Debian Chromium via playwright-core).
//
// Serves app/cors.html on two origins: http://127.0.0.1:<app-port> (the origin
// the server is configured to allow) and http://127.0.0.1:<other-port> (NOT
// allowed). From each origin's page it runs fetch(FHIR + "/metadata"); from the
// allowed origin it also runs a preflighted request (GET FHIR/Patient with an
// Authorization header), whose status must be readable by the page even when it
// is a 401, i.e. the server answers the OPTIONS preflight and puts CORS headers
// on error responses too.
//
// Prints ONE JSON line, exit 0 when allowed.ok && allowed.status == 200 &&
// !forbidden.ok (and, unless --no-preflight, preflight.ok), else 1; 2 = bad args.
import { parseArgs } from "node:util";
import { chromium } from "playwright-core";
import { startStatic } from "./serve.mjs";

const { values: a } = parseArgs({
  options: {
    fhir: { type: "string", default: process.env.SMART_FHIR },
    "app-port": { type: "string", default: process.env.SMART_APP_PORT },
    "other-port": { type: "string", default: process.env.SMART_OTHER_PORT || "0" },
    "no-preflight": { type: "boolean", default: false },
    "timeout-ms": { type: "string", default: process.env.SMART_TIMEOUT_MS || "25000" },
    chromium: { type: "string", default: process.env.CHROMIUM || "/usr/bin/chromium" },
  },
  strict: true,
});
const emit = (o) => process.stdout.write(JSON.stringify(o) + "\n");
const log = (...m) => console.error("[cors]", ...m);

if (!a.fhir || !a["app-port"]) {
  emit({ ok: false, stage: "args", error: "usage: node cors.mjs --fhir URL --app-port N [--other-port M]" });
  process.exit(2);
}
const TOTAL_MS = Math.min(Number(a["timeout-ms"]) || 25000, 120000);
const fhirBase = a.fhir.replace(/\/+$/, "");
const fhirOrigin = new URL(fhirBase).origin;
const requests = [];
let browser, s1, s2, stage = "start", done = false;

async function finish(obj, code) {
  if (done) return;
  done = true;
  clearTimeout(watchdog);
  emit({ ...obj, requests });
  await Promise.race([
    Promise.all([browser?.close(), s1?.close(), s2?.close()].filter(Boolean).map((p) => p.catch(() => {}))),
    new Promise((r) => setTimeout(r, 3000)),
  ]);
  process.exit(code);
}
const watchdog = setTimeout(() => {
  finish({ ok: false, stage, error: `timeout after ${TOTAL_MS} ms` }, 1);
  setTimeout(() => process.exit(1), 4000).unref();
}, TOTAL_MS);

// Runs in the page. Never throws: returns {ok, status} or {ok:false, error}.
async function probe(page, url, init) {
  return page.evaluate(
    async ({ url, init }) => {
      try {
        const r = await fetch(url, { mode: "cors", ...init });
        return { ok: r.ok, status: r.status, contentType: r.headers.get("content-type") };
      } catch (e) {
        return { ok: false, error: `${e.name}: ${e.message}` };
      }
    },
    { url, init },
  );
}

async function main() {
  stage = "static-server";
  s1 = await startStatic({ port: Number(a["app-port"]) });
  s2 = await startStatic({ port: Number(a["other-port"]) || 0 });
  log(`allowed origin ${s1.origin}, other origin ${s2.origin}, FHIR ${fhirBase}`);

  stage = "browser";
  browser = await chromium.launch({
    executablePath: a.chromium,
    headless: true,
    args: ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
    timeout: 15000,
  });
  const context = await browser.newContext({ ignoreHTTPSErrors: true });
  context.setDefaultTimeout(10000);
  const byReq = new Map();
  context.on("request", (req) => {
    if (!req.url().startsWith(fhirOrigin + "/")) return;
    const e = { url: req.url(), method: req.method(), origin: req.headers()["origin"] ?? null, status: null, acao: null };
    byReq.set(req, e);
    requests.push(e);
  });
  context.on("response", (res) => {
    const e = byReq.get(res.request());
    if (!e) return;
    e.status = res.status();
    e.acao = res.headers()["access-control-allow-origin"] ?? null;
    res.request().allHeaders().then((h) => { e.origin = h["origin"] ?? e.origin; }, () => {});
  });
  context.on("requestfailed", (req) => {
    const e = byReq.get(req);
    // ERR_ABORTED after a response = body not read before navigating away: not a failure
    if (e && e.status === null) e.failure = req.failure()?.errorText ?? "failed";
  });

  const page = await context.newPage();
  page.on("console", (m) => log("console", `${m.type()}: ${m.text()}`));

  stage = "allowed";
  await page.goto(`${s1.origin}/cors.html`, { waitUntil: "load" });
  const allowed = await probe(page, `${fhirBase}/metadata`, { headers: { accept: "application/fhir+json" } });
  let preflight = null;
  if (!a["no-preflight"]) {
    stage = "preflight";
    preflight = await probe(page, `${fhirBase}/Patient`, {
      headers: { accept: "application/fhir+json", authorization: "Bearer not-a-valid-token" },
    });
    // Readable status (any, typically 401) = preflight passed and the error
    // response carried Access-Control-Allow-Origin.
    preflight.ok = typeof preflight.status === "number";
  }

  stage = "forbidden";
  await page.goto(`${s2.origin}/cors.html`, { waitUntil: "load" });
  const forbidden = await probe(page, `${fhirBase}/metadata`, { headers: { accept: "application/fhir+json" } });

  const ok = allowed.ok && allowed.status === 200 && !forbidden.ok && (a["no-preflight"] || preflight.ok);
  await finish({
    ok,
    allowedOrigin: s1.origin,
    otherOrigin: s2.origin,
    allowed,
    forbidden,
    ...(preflight ? { preflight } : {}),
  }, ok ? 0 : 1);
}

main().catch((e) => finish({ ok: false, stage, error: String(e?.message ?? e).split("\n")[0] }, 1));
