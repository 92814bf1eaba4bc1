// The lab's OpenID provider: node-oidc-provider (panva, OpenID Certified), configured with one or
// more clients and test users from a fixture file, served over TLS with a lab-CA certificate.
// It is test infrastructure for the identity-aware proxy (skyguard/apps), run in the lab's
// `internet` namespace as idp.test by skyguard/lab/idp/__init__.py; it is not the proxy, and
// nothing in it is trusted by skyguard beyond what OpenID Connect says.
//
// What is ours here is only the glue the library leaves to its user: the account lookup (users
// and their groups from the fixture, read again on every lookup so a test can remove a user from
// a group mid-session) and the sign-in page (a plain HTML form, which a browser or an HTTP client
// fills in). Tokens, PKCE, sessions, discovery and JWKS are the library's.
//
// Usage: node idp.mjs --modules DIR --fixture FILE --issuer URL --cert PEM --key PEM
//                      --listen ADDR[,ADDR...] --port N [--ready FILE]

import { createRequire } from 'node:module';
import { generateKeyPairSync, timingSafeEqual, createHash } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import https from 'node:https';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';

const { values: args } = parseArgs({
  options: {
    modules: { type: 'string' }, fixture: { type: 'string' }, issuer: { type: 'string' },
    cert: { type: 'string' }, key: { type: 'string' }, listen: { type: 'string' },
    port: { type: 'string' }, ready: { type: 'string' },
  },
});

// oidc-provider is installed by scripts/setup outside the checkout (npm ci into DIR).
const resolved = createRequire(join(args.modules, 'package.json')).resolve('oidc-provider');
const { default: Provider } = await import(pathToFileURL(resolved).href);

function fixture() {
  return JSON.parse(readFileSync(args.fixture, 'utf8'));
}

function sameText(a, b) {
  // Compare digests: equal lengths for timingSafeEqual, and no early exit on a password prefix.
  const h = (s) => createHash('sha256').update(String(s)).digest();
  return timingSafeEqual(h(a), h(b));
}

const signingKey = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' });
const initial = fixture();

const provider = new Provider(args.issuer, {
  clients: initial.clients,
  jwks: { keys: [{ ...signingKey, kid: 'lab-idp-1', use: 'sig', alg: 'RS256' }] },
  cookies: { keys: [initial.cookie_key || 'lab-idp-cookie-key-not-secret'] },
  claims: { openid: ['sub'], profile: ['name', 'preferred_username'], email: ['email'], groups: ['groups'] },
  scopes: ['openid', 'profile', 'email', 'groups', 'offline_access'],
  // The ID token carries the profile and groups claims the scopes asked for (the proxy reads
  // them there at sign-in and from userinfo afterwards).
  conformIdTokenClaims: false,
  features: { devInteractions: { enabled: false } },
  pkce: { required: () => true },
  ttl: {
    AccessToken: 3600, AuthorizationCode: 60, IdToken: Number(initial.id_token_ttl || 600),
    Interaction: 600, Session: 3600, Grant: 3600,
  },
  async findAccount(ctx, sub) {
    const user = fixture().users.find((u) => u.username === sub);
    if (!user) return undefined;
    return {
      accountId: sub,
      async claims() {
        const now = fixture().users.find((u) => u.username === sub) || { groups: [] };
        return { sub, name: now.name, preferred_username: sub, email: now.email, groups: now.groups || [] };
      },
    };
  },
  // First-party clients of the lab: no consent page, every scope asked for is granted.
  async loadExistingGrant(ctx) {
    const grantId = ctx.oidc.result?.consent?.grantId || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (grantId) return ctx.oidc.provider.Grant.find(grantId);
    const grant = new ctx.oidc.provider.Grant({ clientId: ctx.oidc.client.clientId, accountId: ctx.oidc.session.accountId });
    grant.addOIDCScope('openid profile email groups');
    await grant.save();
    return grant;
  },
});

const escape = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function page(res, status, body) {
  res.writeHead(status, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
  res.end(`<!doctype html><html><head><title>Lab IdP sign-in</title></head><body>${body}</body></html>`);
}

function loginForm(res, uid, message) {
  page(res, message ? 401 : 200, `<h1>Sign in to the lab</h1>${message ? `<p id="error">${escape(message)}</p>` : ''}
<form method="post" action="/interaction/${escape(uid)}/login">
<label>User <input id="username" name="username" autocomplete="username"></label>
<label>Password <input id="password" name="password" type="password"></label>
<button id="submit" type="submit">Sign in</button></form>`);
}

async function formBody(req) {
  let data = '';
  for await (const chunk of req) {
    data += chunk;
    if (data.length > 8192) throw new Error('form too large');
  }
  return new URLSearchParams(data);
}

async function interaction(req, res) {
  const details = await provider.interactionDetails(req, res);
  if (req.method === 'GET') return loginForm(res, details.uid);
  const form = await formBody(req);
  const user = fixture().users.find((u) => u.username === form.get('username'));
  if (!user || !sameText(user.password, form.get('password') || '')) {
    return loginForm(res, details.uid, 'Wrong user name or password.');
  }
  await provider.interactionFinished(req, res, { login: { accountId: user.username } }, { mergeWithLastSubmission: false });
}

const callback = provider.callback();
const tls = { cert: readFileSync(args.cert), key: readFileSync(args.key) };
function handle(req, res) {
  if (req.url.startsWith('/interaction/')) {
    interaction(req, res).catch((err) => page(res, 400, `<p id="error">${escape(err.message)}</p>`));
    return;
  }
  callback(req, res);
}
// One listener per address given ("::" is dual stack: idp.test's A and AAAA both reach it).
const addresses = args.listen.split(',');
let listening = 0;
for (const address of addresses) {
  https.createServer(tls, handle).listen(Number(args.port), address, () => {
    listening += 1;
    if (listening === addresses.length && args.ready) writeFileSync(args.ready, `${process.pid}\n`);
  });
}
// Exit at once: a client's idle keep-alive connection must not hold a stopping provider open.
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => process.exit(0));
