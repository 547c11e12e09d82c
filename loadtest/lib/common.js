// Helpers shared by the floodgate k6 scripts: environment, synthetic client
// addresses, and checks of the documented headers and bodies of allowed,
// limited and banned answers.

import { check } from 'k6';
import exec from 'k6/execution';

// ------------------------------------------------------------ environment

export function env(name, fallback) {
  const v = __ENV[name];
  return v === undefined || v === '' ? fallback : v;
}

export function num(name, fallback) {
  const v = env(name, undefined);
  if (v === undefined) return fallback;
  const n = Number(v);
  if (!Number.isFinite(n)) throw new Error(`${name}=${v} is not a number`);
  return n;
}

// BASE_URL: one gateway, or a comma-separated list of nodes.
export function nodes() {
  return env('BASE_URL', 'http://127.0.0.1:8080')
    .split(',')
    .map((s) => s.trim().replace(/\/+$/, ''))
    .filter((s) => s.length > 0);
}

// "250ms", "10s", "2m", "1h" or plain seconds -> seconds.
export function seconds(d) {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m|h)?$/.exec(String(d).trim());
  if (!m) throw new Error(`bad duration: ${d}`);
  const n = Number(m[1]);
  return { ms: n / 1000, s: n, m: n * 60, h: n * 3600, undefined: n }[m[2]];
}

// The limits the gateway under test enforces, as the scripts expect them.
// RULE_PER is the rule's `per`, as a duration; RULE_RATE tokens per RULE_PER.
export function ruleFromEnv(prefix, defaults) {
  const rate = num(`${prefix}_RATE`, defaults.rate);
  const per = seconds(env(`${prefix}_PER`, defaults.per || '1s'));
  return {
    name: env(`${prefix}_NAME`, defaults.name),
    rate, // tokens per `per`
    per, // seconds
    perSecond: rate / per,
    burst: num(`${prefix}_BURST`, defaults.burst),
  };
}

// Most requests one subject can be allowed over `t` seconds: a full bucket
// plus what refills meanwhile, plus one for a refill landing on the edge.
export function bucketBound(rule, t) {
  return Math.floor(rule.burst + rule.perSecond * t) + 1;
}

// An example of what went wrong, without flooding the output: one line per
// VU, from the first few VUs only (the counters and thresholds say how many).
let noted = 0;
export function note(msg) {
  if (noted++ === 0 && exec.vu.idInTest <= 5) console.error(msg);
}

// ---------------------------------------------------------------- clients

// Synthetic client addresses come from 198.18.0.0/15 (RFC 2544, reserved
// for benchmarks): client i of run `run` is address run*1024 + i of it, so
// runs against a long-lived gateway do not inherit each other's buckets or
// bans. They only ever appear in X-Forwarded-For, which the gateway honours
// from trusted proxies (loopback by default).
export function clientIp(run, i) {
  const n = (run * 1024 + i) % 131072;
  return `198.${18 + (n >> 16)}.${(n >> 8) & 255}.${n & 255}`;
}

// RUN_ID pins the address block (0..127); by default setup() draws one.
export function runId() {
  const pinned = env('RUN_ID', undefined);
  return pinned !== undefined ? Number(pinned) % 128 : Math.floor(Math.random() * 128);
}

// ---------------------------------------------------------------- headers

export function header(res, name) {
  const want = name.toLowerCase();
  for (const k in res.headers) {
    if (k.toLowerCase() === want) return res.headers[k];
  }
  return undefined;
}

// A RateLimit-Policy or RateLimit field: a structured-field List of
// `"name";k=v;...` items -> [{name, params}], or null when malformed.
// (Names are rule names: no commas, quotes or semicolons inside.)
export function parseItems(v) {
  if (typeof v !== 'string' || v.trim() === '') return null;
  const items = [];
  for (const part of v.split(',')) {
    const m = /^\s*"([^"]*)"((?:;[a-z]+=(?:\d+|"[^"]*"))*)\s*$/.exec(part);
    if (!m) return null;
    const params = {};
    for (const p of m[2].split(';').slice(1)) {
      const [k, raw] = p.split('=');
      params[k] = raw.startsWith('"') ? raw.slice(1, -1) : Number(raw);
    }
    items.push({ name: m[1], params });
  }
  return items;
}

// Whether a policy item matches its configured rule. A rule is
// {burst, perSecond} (token bucket), {quota, periodS} (calendar quota) or
// {concurrency} (cap on requests in flight).
function policyMatches(item, rule) {
  const p = item.params;
  if (rule === undefined) return false;
  if (rule.concurrency !== undefined) {
    return p.q === rule.concurrency && p.qu === 'concurrent-requests' && p.w === undefined;
  }
  if (rule.quota !== undefined) return p.q === rule.quota && p.w === rule.periodS;
  return p.q === rule.burst && p.w === Math.max(1, Math.ceil(rule.burst / rule.perSecond - 1e-9));
}

function isUint(v) {
  return typeof v === 'string' && /^\d+$/.test(v);
}

function json(res) {
  try {
    return JSON.parse(res.body);
  } catch (_) {
    return null;
  }
}

// The RateLimit headers agree with each other and, when `rules` is given
// (a map name -> rule), with the configured limits of the rules they name:
// RateLimit-Policy and RateLimit list the same policies in the same order,
// and the older trio repeats the tightest (fewest left). Returns that
// tightest item as {name, r, t} (or null).
export function rateHeadersOk(res, rules, tags) {
  const policies = parseItems(header(res, 'RateLimit-Policy'));
  const states = parseItems(header(res, 'RateLimit'));
  const limit = header(res, 'RateLimit-Limit');
  const remaining = header(res, 'RateLimit-Remaining');
  const reset = header(res, 'RateLimit-Reset');
  const same =
    policies !== null &&
    states !== null &&
    policies.length === states.length &&
    policies.every((p, i) => p.name === states[i].name);
  let tightest = null;
  if (same) {
    states.forEach((s, i) => {
      if (tightest === null || s.params.r < tightest.r) {
        tightest = { name: s.name, r: s.params.r, t: s.params.t, q: policies[i].params.q };
      }
    });
  }
  check(
    res,
    {
      'RateLimit-Policy is a list of "<rule>";q=<n>[;w=<secs>][;qu=...]': () =>
        policies !== null && policies.every((p) => Number.isInteger(p.params.q)),
      'RateLimit is a list of "<rule>";r=<left>[;t=<secs>]': () =>
        states !== null && states.every((s) => Number.isInteger(s.params.r)),
      'RateLimit-Limit, -Remaining, -Reset are integers': () =>
        isUint(limit) && isUint(remaining) && isUint(reset),
      'RateLimit names the same rules as RateLimit-Policy': () => same,
      'legacy trio repeats the tightest policy': () =>
        tightest !== null &&
        Number(limit) === tightest.q &&
        Number(remaining) === tightest.r &&
        Number(reset) === (tightest.t === undefined ? 0 : tightest.t),
      'remaining <= quota': () =>
        same && states.every((s, i) => s.params.r <= policies[i].params.q),
      'policies match the configured rules': () =>
        !rules || (policies !== null && policies.every((p) => policyMatches(p, rules[p.name]))),
    },
    tags,
  );
  return tightest;
}

const PROBLEM_TYPES = 'https://iana.org/assignments/http-problem-types#';

// A 429 from a rule: Retry-After, RateLimit headers of the refusing rules,
// and the problem-details body (RFC 9457) with the gateway's own fields.
// Returns the body (or null).
export function limitedOk(res, rules, tags) {
  const body = json(res);
  const ra = header(res, 'Retry-After');
  check(
    res,
    {
      'limited: status 429': (r) => r.status === 429,
      'limited: Retry-After is a whole number >= 1': () => isUint(ra) && Number(ra) >= 1,
      'limited: body is {"error":"rate_limited","rule","retry_after"}': () =>
        body !== null &&
        body.error === 'rate_limited' &&
        typeof body.rule === 'string' &&
        Number.isInteger(body.retry_after),
      'limited: body retry_after equals Retry-After': () =>
        body !== null && String(body.retry_after) === ra,
      'limited: body names a configured rule': () =>
        !rules || (body !== null && rules[body.rule] !== undefined),
      'limited: content-type is application/problem+json': () =>
        /application\/problem\+json/.test(header(res, 'Content-Type') || ''),
      'limited: problem type quota-exceeded, status 429': () =>
        body !== null && body.type === `${PROBLEM_TYPES}quota-exceeded` && body.status === 429,
      'limited: violated-policies names the rule': () =>
        body !== null &&
        Array.isArray(body['violated-policies']) &&
        body['violated-policies'].includes(body.rule),
    },
    tags,
  );
  rateHeadersOk(res, rules, tags);
  const listed = parseItems(header(res, 'RateLimit'));
  check(
    res,
    {
      'limited: RateLimit lists the refusing rules': () =>
        body !== null &&
        listed !== null &&
        listed.map((i) => i.name).join(',') === body['violated-policies'].join(','),
    },
    tags,
  );
  return body;
}

// An answer to a banned client: ban status, Retry-After, the JSON body.
export function bannedOk(res, status, tags) {
  const body = json(res);
  const ra = header(res, 'Retry-After');
  check(
    res,
    {
      'banned: status is ban.status': (r) => r.status === status,
      'banned: Retry-After is a whole number >= 1': () => isUint(ra) && Number(ra) >= 1,
      'banned: body is {"error":"banned","retry_after"}': () =>
        body !== null && body.error === 'banned' && Number.isInteger(body.retry_after),
      'banned: body retry_after equals Retry-After': () =>
        body !== null && String(body.retry_after) === ra,
      'banned: problem type abnormal-usage-detected': () =>
        body !== null && body.type === `${PROBLEM_TYPES}abnormal-usage-detected`,
    },
    tags,
  );
  return body;
}

// What kind of answer this is: 'allowed' (2xx from the upstream),
// 'limited', 'banned', or 'error' (anything else: 5xx, timeouts, junk).
export function kind(res) {
  if (res.status >= 200 && res.status < 300) return 'allowed';
  if (res.status === 0) return 'error';
  const body = json(res);
  if (body && body.error === 'rate_limited' && res.status === 429) return 'limited';
  if (body && body.error === 'banned') return 'banned';
  return 'error';
}
