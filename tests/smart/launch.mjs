#!/usr/bin/env node
// Real-browser SMART App Launch driver for carevault.
//
// Serves the test app (app/) on http://127.0.0.1:<app-port>, launches Debian's
// Chromium headless through playwright-core, opens launch.html (which calls
// FHIR.oauth2.authorize from the real fhirclient library), fills the server's
// login and consent pages, and waits for the app page (index.html, which calls
// FHIR.oauth2.ready, client.patient.read() and an Observation search) to
// render #result or #error.
//
// Prints exactly ONE JSON line on stdout, exit 0 when ok, 1 otherwise (2 = bad
// arguments). Diagnostics go to stderr. See README.md for the format.
import { parseArgs } from "node:util";
import fs from "node:fs/promises";
import path from "node:path";
import { chromium } from "playwright-core";
import { startStatic } from "./serve.mjs";

const USAGE = `usage: node launch.mjs --fhir https://127.0.0.1:P/fhir --app-port N --client-id ID \\
         --scope "launch/patient openid fhirUser patient/Patient.rs ..." \\
         --username U --password PW [--totp CODE] [--patient ID] [--deny] [--refresh] \\
         [--launch TOKEN] [--screenshots DIR] [--timeout-ms 25000] [--chromium /usr/bin/chromium]`;

const { values: a } = parseArgs({
  options: {
    fhir: { type: "string", default: process.env.SMART_FHIR },
    "app-port": { type: "string", default: process.env.SMART_APP_PORT || "0" },
    "client-id": { type: "string", default: process.env.SMART_CLIENT_ID },
    scope: { type: "string", default: process.env.SMART_SCOPE },
    username: { type: "string", default: process.env.SMART_USERNAME },
    password: { type: "string", default: process.env.SMART_PASSWORD },
    totp: { type: "string", default: process.env.SMART_TOTP },
    patient: { type: "string", default: process.env.SMART_PATIENT },
    launch: { type: "string", default: process.env.SMART_LAUNCH },
    deny: { type: "boolean", default: false },
    refresh: { type: "boolean", default: false },
    screenshots: { type: "string", default: process.env.SMART_SCREENSHOTS },
    "timeout-ms": { type: "string", default: process.env.SMART_TIMEOUT_MS || "25000" },
    chromium: { type: "string", default: process.env.CHROMIUM || "/usr/bin/chromium" },
    help: { type: "boolean", default: false },
  },
  strict: true,
});

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}
const log = (...m) => console.error("[launch]", ...m);

if (a.help) {
  console.error(USAGE);
  process.exit(0);
}
for (const k of ["fhir", "client-id", "scope", "username", "password"]) {
  if (!a[k]) {
    emit({ ok: false, stage: "args", error: `missing --${k}` });
    console.error(USAGE);
    process.exit(2);
  }
}

const TOTAL_MS = Math.min(Number(a["timeout-ms"]) || 25000, 120000);
const started = Date.now();
const remaining = () => Math.max(1, TOTAL_MS - (Date.now() - started));
const fhirBase = a.fhir.replace(/\/+$/, "");
const fhirOrigin = new URL(fhirBase).origin;

const requests = [];
const screenshots = [];
const consentScopes = [];
let patientOptions = null;
let stage = "start";
let browser = null;
let statik = null;
let finished = false;

async function cleanup() {
  const closing = [];
  if (browser) closing.push(browser.close().catch(() => {}));
  if (statik) closing.push(statik.close().catch(() => {}));
  await Promise.race([Promise.all(closing), new Promise((r) => setTimeout(r, 3000))]);
}

async function finish(obj, code) {
  if (finished) return;
  finished = true;
  clearTimeout(watchdog);
  emit({ ...obj, appOrigin, requests, screenshots, elapsedMs: Date.now() - started });
  await cleanup();
  process.exit(code);
}

// Hard watchdog: never hang, whatever Playwright or the server does.
const watchdog = setTimeout(() => {
  finish({ ok: false, stage, error: `timeout after ${TOTAL_MS} ms` }, 1);
  setTimeout(() => process.exit(1), 4000).unref();
}, TOTAL_MS);

async function shot(page, name) {
  if (!a.screenshots) return;
  try {
    await fs.mkdir(a.screenshots, { recursive: true });
    const file = path.join(a.screenshots, `${String(screenshots.length + 1).padStart(2, "0")}-${name}.png`);
    await page.screenshot({ path: file, fullPage: true, timeout: Math.min(5000, remaining()) });
    screenshots.push(path.resolve(file));
  } catch (e) {
    log(`screenshot ${name} failed: ${e.message}`);
  }
}

function recordNetwork(context) {
  const byReq = new Map();
  context.on("request", (req) => {
    let origin;
    try { origin = new URL(req.url()).origin; } catch { return; }
    if (origin !== fhirOrigin) return;
    const entry = {
      url: req.url(),
      method: req.method(),
      status: null,
      resourceType: req.resourceType(),
      acao: null,
    };
    byReq.set(req, entry);
    requests.push(entry);
  });
  context.on("response", (res) => {
    const entry = byReq.get(res.request());
    if (!entry) return;
    entry.status = res.status();
    const h = res.headers();
    entry.acao = h["access-control-allow-origin"] ?? null;
    if (h["access-control-allow-credentials"]) entry.acac = h["access-control-allow-credentials"];
    if (h["location"]) entry.location = h["location"];
  });
  context.on("requestfailed", (req) => {
    const entry = byReq.get(req);
    if (!entry || entry.status !== null) return; // ERR_ABORTED after a response: not a failure
    entry.failure = req.failure()?.errorText ?? "failed";
  });
}

const appOriginOf = (port) => `http://127.0.0.1:${port}`;
let appOrigin = null;

// What the page currently shows: one of login / consent / server-error /
// app-result / app-error, or null when none of the contract's elements is there.
async function classify(page) {
  let origin;
  try { origin = new URL(page.url()).origin; } catch { return null; }
  return page.evaluate(
    ({ origin, appOrigin, fhirOrigin }) => {
      const q = (s) => document.querySelector(s);
      if (window.__carevaultStale) return { kind: "stale" };
      if (origin === appOrigin) {
        if (q("pre#result")) return { kind: "app-result", text: q("pre#result").textContent };
        if (q("#error")) return { kind: "app-error", text: q("#error").textContent };
        return null;
      }
      if (q("form#login")) {
        return { kind: "login", error: q("#error") ? q("#error").textContent.trim() : null };
      }
      if (q("form#consent")) return { kind: "consent", error: q("#error") ? q("#error").textContent.trim() : null };
      if (q("#error")) return { kind: "server-error", text: q("#error").textContent.trim() };
      // Some other page (e.g. a plain-text error from the server).
      return origin === fhirOrigin && document.readyState === "complete"
        ? { kind: "server-other", text: (document.body ? document.body.innerText : "").slice(0, 500) }
        : null;
    },
    { origin, appOrigin, fhirOrigin },
  ).catch(() => null); // navigation in progress: context destroyed
}

// Mark the current document so waitForState only accepts the next one.
async function markStale(page) {
  await page.evaluate(() => { window.__carevaultStale = true; }).catch(() => {});
}

async function waitForState(page) {
  // Poll: robust across redirects and cross-origin navigations.
  let otherSince = null;
  for (;;) {
    const st = await classify(page);
    if (st && st.kind !== "stale") {
      if (st.kind !== "server-other") return st;
      // give a plain page on the server a moment (it might still redirect)
      otherSince ??= Date.now();
      if (Date.now() - otherSince > 1500) return st;
    }
    if (remaining() <= 50) throw new Error("timed out waiting for the next page");
    await page.waitForTimeout(100);
  }
}

async function main() {
  stage = "static-server";
  statik = await startStatic({ port: Number(a["app-port"]) || 0, log: (l) => log("static", l) });
  appOrigin = statik.origin;
  log(`app origin ${appOrigin}, FHIR ${fhirBase}`);

  stage = "browser";
  browser = await chromium.launch({
    executablePath: a.chromium,
    headless: true,
    args: ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
    timeout: Math.min(15000, remaining()),
  });
  const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 900, height: 900 } });
  context.setDefaultTimeout(Math.min(10000, remaining()));
  recordNetwork(context);
  const page = await context.newPage();
  const consoleLines = [];
  page.on("console", (m) => {
    const line = `${m.type()}: ${m.text()}`;
    consoleLines.push(line);
    if (m.type() === "error" || m.type() === "warning") log("console", line);
  });
  page.on("pageerror", (e) => log("pageerror", e.message));

  const q = new URLSearchParams({ iss: fhirBase, clientId: a["client-id"], scope: a.scope });
  if (a.launch) q.set("launch", a.launch);
  if (a.refresh) q.set("refresh", "1");
  const launchUrl = `${appOrigin}/launch.html?${q}`;

  stage = "launch";
  log(`open ${launchUrl}`);
  await page.goto(launchUrl, { waitUntil: "domcontentloaded", timeout: remaining() });

  let st = await waitForState(page);
  let loggedIn = false;
  let consented = false;
  const base = () => ({ consentScopes, patientOptions });

  for (let step = 0; step < 6; step++) {
    log(`page ${st.kind} at ${page.url().split("?")[0]}`);
    if (st.kind === "login") {
      stage = "login";
      if (loggedIn) {
        await shot(page, "login-failed");
        return finish({ ok: false, stage, error: st.error || "login form shown again after submitting credentials", ...base() }, 1);
      }
      await shot(page, "login");
      await page.fill("form#login input[name=username]", a.username);
      await page.fill("form#login input[name=password]", a.password);
      if (a.totp) {
        if (!(await page.$("form#login input[name=totp]"))) {
          return finish({ ok: false, stage, error: "--totp given but the login form has no input[name=totp]" }, 1);
        }
        await page.fill("form#login input[name=totp]", a.totp);
      }
      loggedIn = true;
      await markStale(page);
      await page.click("form#login button[type=submit]", { noWaitAfter: true });
      st = await waitForState(page);
      continue;
    }
    if (st.kind === "consent") {
      stage = "consent";
      if (consented) {
        await shot(page, "consent-again");
        return finish({ ok: false, stage, error: st.error || "consent form shown again after deciding", ...base() }, 1);
      }
      const info = await page.evaluate(() => ({
        scopes: [...document.querySelectorAll("ul#scopes li")].map((li) => li.textContent.trim()),
        options: document.querySelector("form#consent select[name=patient]")
          ? [...document.querySelectorAll("form#consent select[name=patient] option")].map((o) => ({
              value: o.value,
              label: o.textContent.trim(),
            }))
          : null,
      }));
      consentScopes.push(...info.scopes);
      patientOptions = info.options;
      if (patientOptions) {
        if (!a.patient && !a.deny) {
          await shot(page, "consent");
          return finish({ ok: false, stage, error: "consent page shows a patient picker but no --patient was given", ...base() }, 1);
        }
        if (a.patient) {
          if (!patientOptions.some((o) => o.value === a.patient)) {
            await shot(page, "consent");
            return finish({ ok: false, stage, error: `patient ${a.patient} is not among the picker options`, ...base() }, 1);
          }
          await page.selectOption("form#consent select[name=patient]", a.patient);
        }
      }
      await shot(page, "consent");
      const decision = a.deny ? "deny" : "approve";
      consented = true;
      stage = a.deny ? "deny" : "app";
      await markStale(page);
      await page.click(`form#consent button[name=decision][value=${decision}]`, { noWaitAfter: true });
      st = await waitForState(page);
      continue;
    }
    if (st.kind === "server-error" || st.kind === "server-other") {
      await shot(page, "server-error");
      return finish({ ok: false, stage: stage === "launch" ? "authorize" : stage, serverError: true, error: st.text, url: page.url(), ...base() }, 1);
    }
    if (st.kind === "app-error") {
      stage = consented ? "app" : "launch";
      await shot(page, "app-error");
      if (a.deny) {
        const denied = /access_denied/.test(st.text);
        return finish({ ok: denied, stage: denied ? "denied" : "deny", denied, error: st.text, url: page.url(), ...base() }, denied ? 0 : 1);
      }
      return finish({ ok: false, stage, error: st.text, url: page.url(), console: consoleLines.slice(-20), ...base() }, 1);
    }
    if (st.kind === "app-result") {
      stage = "result";
      await shot(page, "result");
      if (a.deny) {
        return finish({ ok: false, stage: "deny", error: "app was authorized although deny was pressed", ...base() }, 1);
      }
      let r;
      try { r = JSON.parse(st.text); } catch (e) {
        return finish({ ok: false, stage, error: `unparsable #result: ${e.message}` }, 1);
      }
      if (a.patient && r.patientId !== a.patient) {
        log(`warning: patient in context ${r.patientId} != picked ${a.patient}`);
      }
      return finish({
        ok: true,
        patientId: r.patientId,
        patient: r.patient,
        observations: r.observations,
        scope: r.tokenScope,
        fhirUser: r.fhirUser ?? r.fhirUserRaw ?? null,
        fhirUserRaw: r.fhirUserRaw,
        fhirclientIdTokenError: r.fhirclientIdTokenError,
        idTokenHeader: r.idTokenHeader,
        idTokenClaims: r.idTokenClaims,
        token: {
          tokenType: r.tokenType,
          expiresIn: r.expiresIn,
          hasRefreshToken: r.hasRefreshToken,
          hasIdToken: r.hasIdToken,
          needPatientBanner: r.needPatientBanner,
          smartStyleUrl: r.smartStyleUrl,
        },
        refresh: r.refresh ?? null,
        ...base(),
      }, 0);
    }
  }
  return finish({ ok: false, stage, error: "too many pages without reaching the app", ...base() }, 1);
}

main().catch((e) => finish({ ok: false, stage, error: String(e && e.message ? e.message : e).split("\n")[0] }, 1));
