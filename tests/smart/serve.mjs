// Static HTTP server for the SMART test app (plain node:http, no framework).
//
// Serves tests/smart/app/ plus fhirclient's browser bundle at /fhir-client.js.
// Used by launch.mjs and cors.mjs; also runnable by hand:
//   node serve.mjs --port 8765
import http from "node:http";
import fs from "node:fs/promises";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { parseArgs } from "node:util";

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const APP_DIR = path.join(HERE, "app");
export const BUNDLE = path.join(HERE, "node_modules", "fhirclient", "build", "fhir-client.js");

const TYPES = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".mjs": "text/javascript; charset=utf-8",
  ".map": "application/json; charset=utf-8",
  ".json": "application/json; charset=utf-8",
  ".css": "text/css; charset=utf-8",
};

async function resolveFile(urlPath) {
  if (urlPath === "/fhir-client.js") return BUNDLE;
  if (urlPath === "/fhir-client.js.map") return BUNDLE + ".map";
  if (urlPath === "/" || urlPath === "") urlPath = "/index.html";
  const rel = path.normalize(decodeURIComponent(urlPath)).replace(/^(\.\.[/\\])+/, "");
  const file = path.join(APP_DIR, rel);
  if (!file.startsWith(APP_DIR + path.sep)) return null;
  return file;
}

/**
 * Start the static server on 127.0.0.1:port (0 = any free port).
 * Resolves to { server, port, origin, close() }.
 */
export function startStatic({ port = 0, host = "127.0.0.1", log = () => {} } = {}) {
  const server = http.createServer(async (req, res) => {
    const u = new URL(req.url, "http://x");
    if (u.pathname === "/favicon.ico") {
      res.writeHead(204);
      return res.end();
    }
    let body = null;
    let file = null;
    try {
      file = await resolveFile(u.pathname);
      if (file) body = await fs.readFile(file);
    } catch {
      body = null;
    }
    log(`${req.method} ${req.url} -> ${body ? 200 : 404}`);
    if (req.method !== "GET" && req.method !== "HEAD") {
      res.writeHead(405, { allow: "GET, HEAD" });
      return res.end();
    }
    if (!body) {
      res.writeHead(404, { "content-type": "text/plain" });
      return res.end("not found\n");
    }
    res.writeHead(200, {
      "content-type": TYPES[path.extname(file)] || "application/octet-stream",
      "cache-control": "no-store",
    });
    res.end(req.method === "HEAD" ? undefined : body);
  });
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, host, () => {
      const p = server.address().port;
      resolve({
        server,
        port: p,
        origin: `http://${host}:${p}`,
        close: () => new Promise((r) => { server.closeAllConnections?.(); server.close(() => r()); }),
      });
    });
  });
}

if (import.meta.url === pathToFileURL(process.argv[1] || "").href) {
  const { values } = parseArgs({ options: { port: { type: "string", default: "0" } } });
  const s = await startStatic({ port: Number(values.port), log: (l) => console.error(l) });
  console.log(s.origin);
}
