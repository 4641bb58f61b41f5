// A real OpenID Connect provider (oidc-provider) for carevault's integration tests.
//
// Guarantees:
// - Listens on 127.0.0.1 only. Port from argv[2] or OIDC_PORT (0 or unset = random).
// - When listening, prints exactly one JSON line on stdout: {"issuer":"http://127.0.0.1:PORT","port":PORT}.
//   Everything else (oidc-provider notices, errors) goes to stderr.
// - One confidential client (client_secret_basic), authorization_code + refresh_token, PKCE (S256) required.
// - Access tokens are JWTs (typ at+jwt) for the resource OIDC_RESOURCE with audience OIDC_AUDIENCE;
//   they and the ID token carry `carevault_roles` and `fhirUser` from the OIDC_ACCOUNTS table.
// - Login never needs a browser: see README.md (`/interaction/:uid/login?sub=`, `POST /__authorize`).
// - `POST /__rotate` replaces the signing keys, `POST /__shutdown` stops the process.
// This is a test fixture: the admin routes have no authentication. Never expose it beyond loopback.

import * as crypto from 'node:crypto';
import * as http from 'node:http';
import Provider, { errors } from 'oidc-provider';

// Keep stdout for the single ready line.
console.info = console.error;
console.log = console.error;

function fail(message) {
  process.stderr.write(`oidc fixture: ${message}\n`);
  process.exit(2);
}

const env = process.env;
const port = Number(process.argv[2] ?? env.OIDC_PORT ?? 0);
if (!Number.isInteger(port) || port < 0 || port > 65535) fail('port must be an integer 0..65535');

const clientId = env.OIDC_CLIENT_ID ?? 'carevault';
const clientSecret = env.OIDC_CLIENT_SECRET;
if (!clientSecret || clientSecret.length < 16) fail('OIDC_CLIENT_SECRET must be set (16+ characters)');
const redirectUris = (env.OIDC_REDIRECT_URIS ?? env.OIDC_REDIRECT_URI ?? '').split(/\s+/).filter(Boolean);
if (redirectUris.length === 0) fail('OIDC_REDIRECT_URI must be set (space-separated list allowed)');
const resource = env.OIDC_RESOURCE ?? 'urn:carevault:api';
const audience = env.OIDC_AUDIENCE ?? 'carevault';
const resourceScopes = env.OIDC_RESOURCE_SCOPES ?? 'openid carevault';
const idTokenAlg = env.OIDC_ID_TOKEN_ALG ?? 'RS256';
if (!['RS256', 'EdDSA'].includes(idTokenAlg)) fail('OIDC_ID_TOKEN_ALG must be RS256 or EdDSA');
const accessTokenTtl = Number(env.OIDC_ACCESS_TOKEN_TTL ?? 300);
const defaultSub = env.OIDC_DEFAULT_SUB;

let accounts;
try {
  accounts = new Map(JSON.parse(env.OIDC_ACCOUNTS ?? '[]').map((a) => {
    if (typeof a.sub !== 'string' || !a.sub) throw new Error('every account needs a string "sub"');
    if (a.roles !== undefined && !Array.isArray(a.roles)) throw new Error('"roles" must be an array');
    return [a.sub, { roles: a.roles ?? [], fhirUser: a.fhirUser, email: a.email, name: a.name }];
  }));
} catch (err) {
  fail(`OIDC_ACCOUNTS is not a valid JSON account list: ${err.message}`);
}

// The claims a token carries for an account: the two custom ones, plus optional profile data.
function customClaims(sub) {
  const account = accounts.get(sub);
  if (!account) return {};
  const claims = { carevault_roles: account.roles };
  if (account.fhirUser) claims.fhirUser = account.fhirUser;
  return claims;
}

// One RS256 and one Ed25519 signing key, each with a fresh `kid`.
function freshKeys() {
  return [['RS256', 'rsa', { modulusLength: 2048 }], ['EdDSA', 'ed25519', {}]].map(([alg, type, options]) => {
    const { privateKey } = crypto.generateKeyPairSync(type, options);
    return { ...privateKey.export({ format: 'jwk' }), alg, use: 'sig', kid: `${alg.toLowerCase()}-${crypto.randomUUID()}` };
  });
}

// Cookie-signing keys survive key rotation, so interactions in flight keep working.
const cookieKeys = [crypto.randomBytes(32).toString('base64url')];

function buildProvider(issuer, jwks) {
  const provider = new Provider(issuer, {
    clients: [{
      client_id: clientId,
      client_secret: clientSecret,
      redirect_uris: redirectUris,
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
      token_endpoint_auth_method: 'client_secret_basic',
      id_token_signed_response_alg: idTokenAlg,
    }],
    jwks: { keys: jwks },
    cookies: { keys: cookieKeys },
    pkce: { required: () => true },
    scopes: [...new Set(['openid', 'offline_access', 'profile', 'email', ...resourceScopes.split(' ')])],
    claims: {
      openid: ['sub', 'carevault_roles', 'fhirUser'],
      profile: ['name'],
      email: ['email'],
    },
    // Put scope-requested claims in the ID token too (roles must be readable without userinfo).
    conformIdTokenClaims: false,
    async findAccount(_ctx, sub) {
      if (!accounts.has(sub)) return undefined;
      return {
        accountId: sub,
        async claims() {
          const account = accounts.get(sub);
          return { sub, ...customClaims(sub), name: account.name, email: account.email };
        },
      };
    },
    async extraTokenClaims(_ctx, token) {
      return token.accountId ? customClaims(token.accountId) : undefined;
    },
    async issueRefreshToken(_ctx, client) {
      return client.grantTypeAllowed('refresh_token');
    },
    rotateRefreshToken: true,
    ttl: {
      AccessToken: accessTokenTtl,
      AuthorizationCode: 60,
      IdToken: 300,
      Interaction: 600,
      Grant: 3600,
      Session: 3600,
      RefreshToken: 86400,
    },
    interactions: { url: (_ctx, interaction) => `/interaction/${interaction.uid}` },
    features: {
      devInteractions: { enabled: false },
      revocation: { enabled: true },
      introspection: { enabled: true },
      resourceIndicators: {
        enabled: true,
        // The relying party need not send `resource`: tokens are for carevault unless asked otherwise.
        defaultResource: (_ctx, _client, oneOf) => (oneOf ? oneOf[0] : resource),
        useGrantedResource: () => true,
        getResourceServerInfo(_ctx, indicator) {
          if (indicator !== resource) throw new errors.InvalidTarget();
          return {
            scope: resourceScopes,
            audience,
            accessTokenTTL: accessTokenTtl,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg: 'RS256' } },
          };
        },
      },
    },
    async renderError(ctx, out) {
      ctx.type = 'application/json';
      ctx.body = JSON.stringify(out);
    },
  });
  provider.on('server_error', (_ctx, err) => process.stderr.write(`oidc fixture server_error: ${err.stack}\n`));
  return provider;
}

// Login + consent in one step: the grant covers everything the authorization request asked for.
async function finishLogin(provider, req, res, sub) {
  const interaction = await provider.interactionDetails(req, res);
  if (!accounts.has(sub)) {
    return provider.interactionFinished(req, res, { error: 'access_denied', error_description: 'unknown account' }, { mergeWithLastSubmission: false });
  }
  const { params, grantId } = interaction;
  const grant = grantId ? await provider.Grant.find(grantId) : new provider.Grant({ accountId: sub, clientId: params.client_id });
  const scopes = String(params.scope ?? 'openid').split(' ').filter(Boolean);
  grant.addOIDCScope(scopes.join(' '));
  const requested = params.resource ? [].concat(params.resource) : [resource];
  const rsScopes = new Set(resourceScopes.split(' '));
  for (const indicator of requested) {
    grant.addResourceScope(indicator, scopes.filter((s) => rsScopes.has(s)).join(' '));
  }
  const savedGrantId = await grant.save();
  return provider.interactionFinished(req, res, {
    login: { accountId: sub },
    consent: { grantId: savedGrantId },
  }, { mergeWithLastSubmission: false });
}

// Plays the browser: follows the authorization request through this provider, carrying cookies,
// and returns the first redirect that leaves the issuer (the client's redirect_uri with code or error).
async function browse(issuer, url, sub) {
  const jar = new Map();
  let next = new URL(url, issuer);
  for (let hop = 0; hop < 10; hop += 1) {
    if (next.origin !== new URL(issuer).origin) return next.href;
    if (next.pathname.startsWith('/interaction/') && !next.pathname.endsWith('/login')) {
      next = new URL(`${next.pathname}/login?sub=${encodeURIComponent(sub)}`, issuer);
    }
    const cookie = [...jar].map(([k, v]) => `${k}=${v}`).join('; ');
    const response = await fetch(next, { redirect: 'manual', headers: cookie ? { cookie } : {} });
    for (const line of response.headers.getSetCookie()) {
      const [pair] = line.split(';');
      const eq = pair.indexOf('=');
      const name = pair.slice(0, eq).trim();
      const value = pair.slice(eq + 1).trim();
      if (/expires=Thu, 01 Jan 1970/i.test(line) || value === '') jar.delete(name); else jar.set(name, value);
    }
    const location = response.headers.get('location');
    if (!location) {
      const body = await response.text();
      throw new Error(`authorization stopped at ${next.pathname} with status ${response.status}: ${body.slice(0, 300)}`);
    }
    next = new URL(location, next);
  }
  throw new Error('too many redirects');
}

async function readBody(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > 65536) throw new Error('body too large');
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}

function sendJson(res, status, value) {
  const body = JSON.stringify(value);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
  res.end(body);
}

const server = http.createServer();
server.listen(port, '127.0.0.1', async () => {
  const actualPort = server.address().port;
  const issuer = `http://127.0.0.1:${actualPort}`;
  let keys = freshKeys();
  let provider = buildProvider(issuer, keys);

  server.on('request', async (req, res) => {
    const url = new URL(req.url, issuer);
    try {
      const login = url.pathname.match(/^\/interaction\/([^/]+)\/login$/);
      const bare = url.pathname.match(/^\/interaction\/([^/]+)$/);
      if (req.method === 'GET' && login) {
        const sub = url.searchParams.get('sub');
        if (!sub) return sendJson(res, 400, { error: 'sub query parameter required' });
        return await finishLogin(provider, req, res, sub);
      }
      if (req.method === 'GET' && bare) {
        const { params } = await provider.interactionDetails(req, res);
        const sub = params.login_hint ?? defaultSub;
        if (!sub) return sendJson(res, 400, { error: 'login required', login: `${url.pathname}/login?sub=SUB` });
        return await finishLogin(provider, req, res, sub);
      }
      if (req.method === 'POST' && url.pathname === '/__authorize') {
        const body = JSON.parse(await readBody(req));
        if (typeof body.url !== 'string' || typeof body.sub !== 'string') {
          return sendJson(res, 400, { error: 'body must be {"url": "...", "sub": "..."}' });
        }
        return sendJson(res, 200, { location: await browse(issuer, body.url, body.sub) });
      }
      if (req.method === 'POST' && url.pathname === '/__rotate') {
        const previous = keys;
        keys = freshKeys();
        const keep = url.searchParams.get('keep') === '1';
        provider = buildProvider(issuer, keep ? [...keys, ...previous] : keys);
        return sendJson(res, 200, { kids: keys.map((k) => k.kid), retired: keep ? [] : previous.map((k) => k.kid) });
      }
      if (req.method === 'POST' && url.pathname === '/__shutdown') {
        sendJson(res, 200, { stopping: true });
        server.close();
        server.closeAllConnections();
        return undefined;
      }
      return provider.callback()(req, res);
    } catch (err) {
      process.stderr.write(`oidc fixture: ${err.stack}\n`);
      if (!res.headersSent) sendJson(res, 500, { error: 'fixture_error', error_description: err.message });
      return undefined;
    }
  });

  process.stdout.write(`${JSON.stringify({ issuer, port: actualPort })}\n`);
});

server.on('error', (err) => fail(err.message));
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => process.exit(0));
