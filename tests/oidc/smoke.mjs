// Self-check of the OIDC fixture: starts server.mjs, runs the flows the Rust tests rely on, stops it.
// Exits non-zero on the first failed check. Run: `node tests/oidc/smoke.mjs` (after `npm ci` there).

import { spawn } from 'node:child_process';
import * as crypto from 'node:crypto';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

const redirectUri = 'https://127.0.0.1:9/auth/oidc/callback';
const secret = crypto.randomBytes(24).toString('base64url');
const practitioner = `Practitioner/${crypto.randomUUID()}`;
let checks = 0;

function check(condition, what) {
  if (!condition) throw new Error(`check failed: ${what}`);
  checks += 1;
}

const child = spawn(process.execPath, [fileURLToPath(new URL('server.mjs', import.meta.url)), '0'], {
  env: {
    ...process.env,
    OIDC_CLIENT_SECRET: secret,
    OIDC_REDIRECT_URI: redirectUri,
    OIDC_ACCOUNTS: JSON.stringify([
      { sub: 'u1', roles: ['clinician'], fhirUser: practitioner },
      { sub: 'u2', roles: ['nurse', 'auditor'] },
    ]),
  },
  stdio: ['ignore', 'pipe', 'inherit'],
});
const { issuer, port } = JSON.parse(await new Promise((resolve, reject) => {
  createInterface({ input: child.stdout }).once('line', resolve);
  child.once('exit', (code) => reject(new Error(`fixture exited with ${code}`)));
}));

const b64url = (buf) => Buffer.from(buf).toString('base64url');
const decode = (jwt) => jwt.split('.').slice(0, 2).map((part) => JSON.parse(Buffer.from(part, 'base64url')));
const basic = `Basic ${Buffer.from(`carevault:${secret}`).toString('base64')}`;

async function verifyJwt(jwt) {
  const [header, payload] = decode(jwt);
  const { keys } = await (await fetch(`${issuer}/jwks`)).json();
  const jwk = keys.find((k) => k.kid === header.kid);
  if (!jwk) return { ok: false, header, payload };
  const key = crypto.createPublicKey({ key: jwk, format: 'jwk' });
  const [h, p, s] = jwt.split('.');
  const data = Buffer.from(`${h}.${p}`);
  const sig = Buffer.from(s, 'base64url');
  const ok = header.alg === 'EdDSA' ? crypto.verify(null, data, key, sig) : crypto.verify('sha256', data, key, sig);
  return { ok, header, payload };
}

function authorizationUrl(verifier, state) {
  const url = new URL(`${issuer}/auth`);
  url.search = new URLSearchParams({
    client_id: 'carevault',
    response_type: 'code',
    scope: 'openid',
    redirect_uri: redirectUri,
    state,
    nonce: `n-${state}`,
    code_challenge: b64url(crypto.createHash('sha256').update(verifier).digest()),
    code_challenge_method: 'S256',
  });
  return url.href;
}

async function token(form) {
  const response = await fetch(`${issuer}/token`, {
    method: 'POST',
    headers: { authorization: basic, 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams(form),
  });
  return { status: response.status, body: await response.json() };
}

async function authorize(sub) {
  const verifier = b64url(crypto.randomBytes(32));
  const state = b64url(crypto.randomBytes(8));
  const response = await fetch(`${issuer}/__authorize`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ url: authorizationUrl(verifier, state), sub }),
  });
  const { location } = await response.json();
  const back = new URL(location);
  return { verifier, state, back };
}

try {
  const discovery = await (await fetch(`${issuer}/.well-known/openid-configuration`)).json();
  check(discovery.issuer === issuer && issuer === `http://127.0.0.1:${port}`, 'discovery issuer');
  check(discovery.code_challenge_methods_supported.includes('S256'), 'discovery PKCE S256');

  // Authorization code + PKCE through the /__authorize helper.
  const { verifier, state, back } = await authorize('u1');
  check(`${back.origin}${back.pathname}` === redirectUri, 'redirected to the client');
  check(back.searchParams.get('state') === state && back.searchParams.get('iss') === issuer, 'state and iss returned');
  const code = back.searchParams.get('code');
  check(code, 'authorization code returned');

  const wrong = await token({ grant_type: 'authorization_code', code, code_verifier: b64url(crypto.randomBytes(32)), redirect_uri: redirectUri });
  check(wrong.status === 400 && wrong.body.error === 'invalid_grant', 'wrong PKCE verifier refused');

  const second = await authorize('u1');
  const granted = await token({ grant_type: 'authorization_code', code: second.back.searchParams.get('code'), code_verifier: second.verifier, redirect_uri: redirectUri });
  check(granted.status === 200, `token endpoint 200 (got ${granted.status} ${JSON.stringify(granted.body)})`);
  const at = await verifyJwt(granted.body.access_token);
  check(at.ok && at.header.typ === 'at+jwt' && at.header.alg === 'RS256', 'access token is an RS256 at+jwt signed by a JWKS key');
  check(at.payload.aud === 'carevault' && at.payload.iss === issuer && at.payload.sub === 'u1', 'access token aud/iss/sub');
  check(JSON.stringify(at.payload.carevault_roles) === '["clinician"]' && at.payload.fhirUser === practitioner, 'access token custom claims');
  const id = await verifyJwt(granted.body.id_token);
  check(id.ok && id.payload.aud === 'carevault' && id.payload.nonce === `n-${second.state}`, 'id token signature, aud, nonce');
  check(JSON.stringify(id.payload.carevault_roles) === '["clinician"]' && id.payload.fhirUser === practitioner, 'id token custom claims');

  const refreshed = await token({ grant_type: 'refresh_token', refresh_token: granted.body.refresh_token });
  check(refreshed.status === 200 && refreshed.body.refresh_token !== granted.body.refresh_token, 'refresh rotates the refresh token');
  const reused = await token({ grant_type: 'refresh_token', refresh_token: granted.body.refresh_token });
  check(reused.status === 400 && reused.body.error === 'invalid_grant', 'spent refresh token refused');

  // The interaction route, driven like a browser would (cookies carried by hand).
  const v3 = b64url(crypto.randomBytes(32));
  const jar = [];
  const hop = async (url) => {
    const response = await fetch(url, { redirect: 'manual', headers: { cookie: jar.join('; ') } });
    for (const line of response.headers.getSetCookie()) jar.push(line.split(';')[0]);
    return new URL(response.headers.get('location'), url);
  };
  const interaction = await hop(authorizationUrl(v3, 'manual'));
  check(/^\/interaction\/[^/]+$/.test(interaction.pathname), 'authorization redirects to the interaction');
  const resume = await hop(`${interaction.href}/login?sub=u2`);
  const callback = await hop(resume.href);
  check(callback.searchParams.get('state') === 'manual', 'manual interaction completes');
  const manual = await token({ grant_type: 'authorization_code', code: callback.searchParams.get('code'), code_verifier: v3, redirect_uri: redirectUri });
  const manualAt = decode(manual.body.access_token)[1];
  check(manualAt.sub === 'u2' && JSON.stringify(manualAt.carevault_roles) === '["nurse","auditor"]' && !('fhirUser' in manualAt), 'second account claims');

  const unknown = await authorize('nobody');
  check(unknown.back.searchParams.get('error') === 'access_denied', 'unknown account denied');

  // Key rotation: a fresh key signs; the old one is gone from the JWKS (or kept with ?keep=1).
  const before = granted.body.access_token;
  const rotated = await (await fetch(`${issuer}/__rotate`, { method: 'POST' })).json();
  check(!(await verifyJwt(before)).ok, 'token from the retired key no longer verifies');
  const after = await authorize('u1');
  const afterTokens = await token({ grant_type: 'authorization_code', code: after.back.searchParams.get('code'), code_verifier: after.verifier, redirect_uri: redirectUri });
  const afterAt = await verifyJwt(afterTokens.body.access_token);
  check(afterAt.ok && rotated.kids.includes(afterAt.header.kid), 'new tokens use the rotated key');
  await fetch(`${issuer}/__rotate?keep=1`, { method: 'POST' });
  check((await verifyJwt(afterTokens.body.access_token)).ok, 'rotate?keep=1 keeps the previous key published');

  const stop = await fetch(`${issuer}/__shutdown`, { method: 'POST' });
  check(stop.status === 200, 'shutdown accepted');
  const exitCode = await new Promise((resolve) => child.once('exit', resolve));
  check(exitCode === 0, 'fixture exits 0 after shutdown');
  process.stdout.write(`oidc fixture smoke check: all ${checks} checks ok\n`);
} catch (err) {
  child.kill();
  process.stderr.write(`${err.stack}\n`);
  process.exit(1);
}
