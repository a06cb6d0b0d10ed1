// A real OpenID Connect provider for the tests of "Sign in with IServ": panva's certified oidc-provider,
// configured to look like IServ from the relying party's side, plus a few test-only controls.
//
//   node provider.mjs [--port N] [--issuer URL]     (or OIDC_TEST_PORT / OIDC_TEST_ISSUER)
//
// Listens on 127.0.0.1 only; port 0 (the default) takes a free port. The one line it prints on stdout
// is "READY <port>" once it answers; everything else goes to stderr.
//
// Test-only endpoints (the provider refuses them from anywhere but loopback):
//   PUT  /__test__/accounts/<login>  {password, uuid, name, email, groups, roles} -> {sub}
//   POST /__test__/faults            {"next_token": "rogue-signing-key" | "wrong-nonce" | null}

import { randomBytes, randomUUID } from 'node:crypto';
import { createServer } from 'node:http';
import { parseArgs } from 'node:util';

import * as jose from 'jose';
import Provider from 'oidc-provider';

// oidc-provider prints its dev-mode notices with console.info; stdout is kept for the READY line.
console.log = console.error;
console.info = console.error;

const { values: args } = parseArgs({
  options: { port: { type: 'string' }, issuer: { type: 'string' } },
});
const requestedPort = Number(args.port ?? process.env.OIDC_TEST_PORT ?? 0);

// The accounts, keyed by login. findAccount reads this at every use, so a change the test makes
// between two sign-ins (new groups, say) is what the next token and userinfo answer carry.
const accounts = new Map();
const accountsBySub = new Map();

// The provider's one signing key, made here rather than by oidc-provider so that this script holds
// the private key to forge "genuine" tokens with (the wrong-nonce fault).
const signingKid = `sig-${randomUUID()}`;
const signingKey = await jose.generateKeyPair('RS256', { extractable: true });
const signingJwk = {
  ...(await jose.exportJWK(signingKey.privateKey)), kid: signingKid, alg: 'RS256', use: 'sig',
};
// An attacker's key that claims to be the provider's (same kid): its tokens must fail verification.
const attackerKey = await jose.generateKeyPair('RS256');

// What the next token response's id_token is turned into, if anything: one of idTokenFaults.
let nextTokenFault = null;

async function resign(idToken, key, changeClaims) {
  const header = jose.decodeProtectedHeader(idToken);
  const claims = changeClaims(jose.decodeJwt(idToken));
  return new jose.SignJWT(claims).setProtectedHeader(header).sign(key);
}

const idTokenFaults = {
  // The same claims and header (kid included), signed by the attacker's key.
  'rogue-signing-key': (idToken) => resign(idToken, attackerKey.privateKey, (claims) => claims),
  // Signed by the provider's own key, but for another authorization request than the RP's.
  'wrong-nonce': (idToken) => resign(
    idToken,
    signingKey.privateKey,
    (claims) => ({ ...claims, nonce: `not-${claims.nonce}` }),
  ),
};

// Listen before making the provider: with port 0 the issuer (which names the port) is known only now.
const server = createServer();
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(requestedPort, '127.0.0.1', resolve);
});
const { port } = server.address();
const issuer = args.issuer ?? process.env.OIDC_TEST_ISSUER ?? `http://127.0.0.1:${port}`;

const provider = new Provider(issuer, {
  jwks: { keys: [signingJwk] },
  cookies: { keys: [randomBytes(32).toString('base64url')] },
  // IServ's scopes and claims. With conformIdTokenClaims (the default) the scope claims come from
  // the userinfo endpoint only; the ID token carries sub and the protocol claims.
  claims: {
    openid: ['sub'],
    profile: ['name', 'preferred_username'],
    email: ['email'],
    groups: ['groups'],
    roles: ['roles'],
    uuid: ['uuid'],
  },
  async findAccount(ctx, sub) {
    const login = accountsBySub.get(sub);
    if (login === undefined) return undefined;
    return {
      accountId: sub,
      async claims() {
        const account = accounts.get(login);
        return {
          sub,
          uuid: account.uuid,
          preferred_username: login,
          name: account.name,
          email: account.email,
          groups: account.groups,
          roles: account.roles,
        };
      },
    };
  },
  features: {
    devInteractions: { enabled: false }, // its login form takes any password; the forms below check it
    registration: { enabled: true }, // open: every test registers its own client for its own RP port
    rpInitiatedLogout: { enabled: true },
  },
  pkce: { required: () => true }, // for confidential clients too, as the gateway always sends it
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
});

// ---- the login and consent pages, through oidc-provider's interaction API

const escapeHtml = (value) => String(value).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function page(title, body) {
  return `<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>${escapeHtml(title)}</title></head>`
    + `<body><h1>${escapeHtml(title)}</h1>${body}</body></html>\n`;
}

function loginPage(uid, { login = '', message = '' } = {}) {
  return page('Sign in', `${message ? `<p class="error">${escapeHtml(message)}</p>` : ''}
<form id="login" method="post" action="/interaction/${uid}/login">
  <input type="text" name="login" value="${escapeHtml(login)}" required autofocus>
  <input type="password" name="password" required>
  <button type="submit">Sign in</button>
</form>
<a href="/interaction/${uid}/abort">Cancel</a>`);
}

function consentPage(uid, client, details) {
  const scopes = (details.missingOIDCScope ?? []).filter((scope) => scope !== 'openid');
  return page('Authorize', `<p>${escapeHtml(client?.clientName ?? client?.clientId ?? '')} asks for:</p>
<ul>${scopes.map((scope) => `<li>${escapeHtml(scope)}</li>`).join('')}</ul>
<form id="consent" method="post" action="/interaction/${uid}/confirm">
  <input type="hidden" name="prompt" value="consent">
  <button type="submit">Allow</button>
</form>
<a href="/interaction/${uid}/abort">Cancel</a>`);
}

async function readBody(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return Buffer.concat(chunks).toString('utf8');
}

async function finishInteraction(ctx, result, options) {
  ctx.status = 303;
  ctx.redirect(await provider.interactionResult(ctx.req, ctx.res, result, options));
}

async function interactionRoute(ctx, uid, action) {
  const details = await provider.interactionDetails(ctx.req, ctx.res);
  if (details.uid !== uid) ctx.throw(400, 'this is not the interaction in progress');
  const { prompt, params, session, grantId } = details;
  ctx.set('Cache-Control', 'no-store');

  if (ctx.method === 'GET' && action === undefined) {
    ctx.type = 'html';
    if (prompt.name === 'login') {
      ctx.body = loginPage(uid, { login: params.login_hint });
    } else if (prompt.name === 'consent') {
      ctx.body = consentPage(uid, await provider.Client.find(params.client_id), prompt.details);
    } else {
      ctx.throw(501, `no page for the ${prompt.name} prompt`);
    }
  } else if (ctx.method === 'GET' && action === 'abort') {
    await finishInteraction(
      ctx,
      { error: 'access_denied', error_description: 'End-User aborted interaction' },
      { mergeWithLastSubmission: false },
    );
  } else if (ctx.method === 'POST' && action === 'login' && prompt.name === 'login') {
    const form = new URLSearchParams(await readBody(ctx.req));
    const login = form.get('login') ?? '';
    const account = accounts.get(login);
    if (account === undefined || account.password !== form.get('password')) {
      ctx.type = 'html';
      ctx.body = loginPage(uid, { login, message: 'Wrong account name or password.' });
      return;
    }
    await finishInteraction(
      ctx,
      { login: { accountId: account.sub } },
      { mergeWithLastSubmission: false },
    );
  } else if (ctx.method === 'POST' && action === 'confirm' && prompt.name === 'consent') {
    await readBody(ctx.req);
    const grant = grantId
      ? await provider.Grant.find(grantId)
      : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
    if (prompt.details.missingOIDCScope) grant.addOIDCScope(prompt.details.missingOIDCScope.join(' '));
    if (prompt.details.missingOIDCClaims) grant.addOIDCClaims(prompt.details.missingOIDCClaims);
    await finishInteraction(ctx, { consent: { grantId: await grant.save() } }, { mergeWithLastSubmission: true });
  } else {
    ctx.throw(405, `${ctx.method} ${action ?? ''} does not fit the ${prompt.name} prompt`);
  }
}

// ---- the test controls

function isLoopback(address) {
  return address === '127.0.0.1' || address === '::1' || address === '::ffff:127.0.0.1';
}

async function readJson(ctx) {
  try {
    return JSON.parse(await readBody(ctx.req));
  } catch {
    return ctx.throw(400, 'the body is not JSON');
  }
}

async function testRoute(ctx, path) {
  if (!isLoopback(ctx.req.socket.remoteAddress)) ctx.throw(403, 'test controls answer loopback only');
  const accountMatch = /^accounts\/([^/]+)$/.exec(path);
  if (accountMatch && ctx.method === 'PUT') {
    const login = decodeURIComponent(accountMatch[1]);
    const body = await readJson(ctx);
    for (const field of ['password', 'uuid', 'name', 'email']) {
      if (typeof body[field] !== 'string') ctx.throw(400, `${field} must be a string`);
    }
    // IServ sends groups as an object {id: {act, name}}; other providers send a list of names.
    if (typeof body.groups !== 'object' || body.groups === null) ctx.throw(400, 'groups must be an object or a list');
    if (!Array.isArray(body.roles)) ctx.throw(400, 'roles must be a list');
    // sub is opaque and stays with the login across replacements, unlike the account's other fields.
    const sub = accounts.get(login)?.sub ?? randomBytes(12).toString('hex');
    const { password, uuid, name, email, groups, roles } = body;
    accounts.set(login, { sub, password, uuid, name, email, groups, roles });
    accountsBySub.set(sub, login);
    ctx.body = { sub };
  } else if (path === 'faults' && ctx.method === 'POST') {
    const fault = (await readJson(ctx)).next_token ?? null;
    if (fault !== null && !(fault in idTokenFaults)) ctx.throw(400, `no such fault: ${fault}`);
    nextTokenFault = fault;
    ctx.status = 204;
  } else {
    ctx.throw(404, 'no such test control');
  }
}

// Pre-middleware: the pages and controls above, before oidc-provider's own routes.
provider.use(async (ctx, next) => {
  const interaction = /^\/interaction\/([^/]+)(?:\/(login|confirm|abort))?$/.exec(ctx.path);
  if (interaction) return interactionRoute(ctx, interaction[1], interaction[2]);
  if (ctx.path.startsWith('/__test__/')) return testRoute(ctx, ctx.path.slice('/__test__/'.length));
  return next();
});

// Post-middleware: the injected fault takes the next token response that carries an ID token.
provider.use(async (ctx, next) => {
  await next();
  const idToken = ctx.body?.id_token;
  if (ctx.oidc?.route !== 'token' || nextTokenFault === null || typeof idToken !== 'string') return;
  const fault = idTokenFaults[nextTokenFault];
  nextTokenFault = null;
  ctx.body = { ...ctx.body, id_token: await fault(idToken) };
});

server.on('request', provider.callback());
process.stdout.write(`READY ${port}\n`);
