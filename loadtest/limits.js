// limits.js: many clients, each well over its limit, are each allowed what
// the token bucket (and, with PLANS=1, its plan) allows, and not more (nor
// much less).
//
// CLIENTS synthetic clients (distinct X-Forwarded-For, so run k6 from a
// trusted proxy address: loopback by default) each send CLIENT_RATE
// requests/s for DURATION, spread over every node of BASE_URL. k6 counts
// each client's allowed answers (the `allowed` counter, tagged client=cN)
// and thresholds hold every client to
//
//   allowed <= RULE_BURST + RULE_RATE/RULE_PER x (DURATION + TIMEOUT) + 1
//
// (a full bucket plus what refills while requests can reach the gateway),
// and, so that a gateway refusing too much fails as well,
//
//   allowed >= MIN_RATIO x min(offered, RULE_BURST + rate x DURATION).
//
// Two plans (PLANS=1): every client also sends an API key in KEY_HEADER.
// Even clients keep the default plan "free" (FREE_*); odd clients are moved
// to plan "pro" (PRO_*) at setup through the admin API (ADMIN_URL,
// ADMIN_TOKEN; moved back at teardown). Each plan has a token bucket
// (<plan>-rate), a calendar quota (<plan>-quota, QUOTA per PERIOD) and pro
// a concurrency cap (pro-inflight). Every client is then held to the
// smallest of its bounds: the per-ip bucket, its plan's bucket, and its
// plan's quota (times the periods the run touches), and above MIN_RATIO of
// it; every answer must list its plan's policies.
//
// Every 429 must carry Retry-After, the RateLimit headers and the
// problem-details body. Bans should be off (or `ban.after` high) on the
// gateway under test, or clients end up banned and the lower bound fails;
// MIN_RATIO=0 skips it.
//
// Environment:
//   BASE_URL     gateway URL, or a comma-separated list of nodes
//                (default http://127.0.0.1:8080)
//   URL_PATH     request path (default /)
//   DURATION     how long to send (default 30s)
//   CLIENTS      distinct clients (default 20)
//   CLIENT_RATE  requests/s each client sends (default 3 x the rule's rate)
//   RULE_NAME, RULE_RATE, RULE_PER, RULE_BURST
//                the per-client rule (default per-ip, 5 per 1s, burst 10)
//   MIN_RATIO    lower bound as a share of what the bucket allows (default 0.8)
//   TIMEOUT      request timeout, seconds (default 2)
//   RUN_ID       pins the synthetic address block (0..127; default random)
//   PLANS        1: the two-plan scenario (default 0)
//   KEY_HEADER   the [consumers] key header (default X-Api-Key)
//   FREE_RATE, FREE_PER, FREE_BURST, FREE_QUOTA, FREE_PERIOD
//                plan free (default 2 per 1s, burst 4; 30 per hour)
//   PRO_RATE, PRO_PER, PRO_BURST, PRO_QUOTA, PRO_PERIOD, PRO_CONCURRENCY
//                plan pro (default 10 per 1s, burst 20; 150 per hour; 5)
//   ADMIN_URL, ADMIN_TOKEN
//                the admin API that moves the pro clients (PLANS=1)

import { check } from 'k6';
import http from 'k6/http';
import exec from 'k6/execution';
import { Counter } from 'k6/metrics';
import {
  bucketBound,
  clientIp,
  env,
  header,
  kind,
  note,
  limitedOk,
  nodes,
  num,
  parseItems,
  rateHeadersOk,
  ruleFromEnv,
  runId,
  seconds,
} from './lib/common.js';

const RULE = ruleFromEnv('RULE', { name: 'per-ip', rate: 5, per: '1s', burst: 10 });
const WITH_PLANS = num('PLANS', 0) === 1;
const KEY_HEADER = env('KEY_HEADER', 'X-Api-Key');
const PERIOD_S = { hour: 3600, day: 86400, month: 30 * 86400 };

// One plan from the environment: its bucket, its quota and (pro) its cap.
function planFromEnv(name, d) {
  const P = name.toUpperCase();
  const period = env(`${P}_PERIOD`, d.period);
  if (period !== 'hour' && period !== 'day') throw new Error(`${P}_PERIOD must be hour or day`);
  const plan = {
    name,
    rate: ruleFromEnv(P, { name: `${name}-rate`, rate: d.rate, per: d.per, burst: d.burst }),
    quota: { name: `${name}-quota`, quota: num(`${P}_QUOTA`, d.quota), periodS: PERIOD_S[period] },
  };
  plan.rate.name = `${name}-rate`;
  if (d.concurrency !== undefined) {
    plan.cap = { name: `${name}-inflight`, concurrency: num(`${P}_CONCURRENCY`, d.concurrency) };
  }
  plan.rules = [plan.rate, plan.quota].concat(plan.cap ? [plan.cap] : []);
  return plan;
}

const PLAN_LIST = WITH_PLANS
  ? [
      planFromEnv('free', { rate: 2, per: '1s', burst: 4, quota: 30, period: 'hour' }),
      planFromEnv('pro', { rate: 10, per: '1s', burst: 20, quota: 150, period: 'hour', concurrency: 5 }),
    ]
  : [];
const RULES = { [RULE.name]: RULE };
for (const plan of PLAN_LIST) for (const r of plan.rules) RULES[r.name] = r;
const PATH = env('URL_PATH', '/');
const DURATION = env('DURATION', '30s');
const D = seconds(DURATION);
const CLIENTS = num('CLIENTS', 20);
const CLIENT_RATE = num('CLIENT_RATE', RULE.perSecond * 3);
const TIMEOUT = num('TIMEOUT', 2);
const MIN_RATIO = num('MIN_RATIO', 0.8);
const NODES = nodes();

if (CLIENT_RATE <= RULE.perSecond && !WITH_PLANS) {
  throw new Error(`CLIENT_RATE ${CLIENT_RATE}/s is not over the rule's ${RULE.perSecond}/s`);
}

// A quota's calendar periods the run can touch (from now, on this clock,
// which on loopback is Redis' own): a run across a period's end may use the
// quota twice.
function periodsTouched(periodS) {
  const start = Date.now() / 1000;
  const end = start + D + TIMEOUT + 10;
  return Math.floor(end / periodS) - Math.floor(start / periodS) + 1;
}

// Bounds per client: at most what its tightest limit allows, at least
// MIN_RATIO of what its tightest limit allows over DURATION alone.
function bounds(plan) {
  let upper = bucketBound(RULE, D + TIMEOUT);
  let fair = RULE.burst + RULE.perSecond * D;
  if (plan) {
    upper = Math.min(upper, bucketBound(plan.rate, D + TIMEOUT));
    fair = Math.min(fair, plan.rate.burst + plan.rate.perSecond * D);
    upper = Math.min(upper, plan.quota.quota * periodsTouched(plan.quota.periodS));
    fair = Math.min(fair, plan.quota.quota);
  }
  return { upper, lower: Math.floor(MIN_RATIO * Math.min(CLIENT_RATE * D, fair)) };
}

// Client c's plan: even clients free (the default), odd ones pro.
function planOf(c) {
  return WITH_PLANS ? PLAN_LIST[c % 2] : undefined;
}
const BOUNDS = [];
for (let c = 0; c < CLIENTS; c++) BOUNDS.push(bounds(planOf(c)));
const UPPER_ALL = BOUNDS.reduce((a, b) => a + b.upper, 0);

const allowed = new Counter('allowed');
const limited = new Counter('limited');
const errors = new Counter('errors');

const thresholds = {
  checks: ['rate==1'],
  errors: ['count==0'],
  // The clients really were over their limits.
  limited: ['count>0'],
  allowed: [`count<=${UPPER_ALL}`],
  dropped_iterations: [`count<=${Math.ceil(CLIENTS * CLIENT_RATE * 0.01)}`],
};
for (let c = 0; c < CLIENTS; c++) {
  thresholds[`allowed{client:c${c}}`] = [`count<=${BOUNDS[c].upper}`, `count>=${BOUNDS[c].lower}`];
}
if (WITH_PLANS) {
  // Both plans really refused requests.
  thresholds['limited{plan:free}'] = ['count>0'];
  thresholds['limited{plan:pro}'] = ['count>0'];
}

export const options = {
  scenarios: {
    limits: {
      executor: 'constant-arrival-rate',
      rate: CLIENTS * CLIENT_RATE,
      timeUnit: '1s',
      duration: DURATION,
      preAllocatedVUs: Math.max(10, Math.ceil((CLIENTS * CLIENT_RATE) / 10)),
      maxVUs: Math.max(50, CLIENTS * 2),
      gracefulStop: `${TIMEOUT + 1}s`,
    },
  },
  thresholds,
};

function apiKey(run, c) {
  return `lt-${run}-c${c}`;
}

// PLANS=1: move the pro clients to plan pro (or back, with `plan` null).
function assignPlans(run, plan) {
  const admin = env('ADMIN_URL', undefined);
  if (!admin) throw new Error('PLANS=1 needs ADMIN_URL (and ADMIN_TOKEN) to move keys to plan pro');
  const headers = { Authorization: `Bearer ${env('ADMIN_TOKEN', '')}` };
  for (let c = 1; c < CLIENTS; c += 2) {
    const url = `${admin}/admin/consumers/${encodeURIComponent(apiKey(run, c))}`;
    const res = plan
      ? http.put(url, JSON.stringify({ plan }), { headers })
      : http.del(url, null, { headers });
    const ok = plan ? res.status === 201 || res.status === 200 : res.status === 204;
    if (!ok) throw new Error(`admin ${plan ? 'PUT' : 'DELETE'} ${url}: ${res.status} ${res.body}`);
  }
}

export function setup() {
  const lows = BOUNDS.map((b) => b.lower);
  const ups = BOUNDS.map((b) => b.upper);
  console.log(
    `${CLIENTS} clients x ${CLIENT_RATE}/s for ${D}s; each allowed between ` +
      `${Math.min(...lows)}..${Math.max(...lows)} and ${Math.min(...ups)}..${Math.max(...ups)}` +
      (WITH_PLANS ? ' (two plans)' : ''),
  );
  const run = runId();
  if (WITH_PLANS) assignPlans(run, 'pro');
  return { run };
}

export function teardown(data) {
  if (WITH_PLANS) assignPlans(data.run, null);
}

export default function (data) {
  const i = exec.scenario.iterationInTest;
  const c = i % CLIENTS;
  const base = NODES[Math.floor(i / CLIENTS) % NODES.length];
  const plan = planOf(c);
  const tags = plan ? { client: `c${c}`, plan: plan.name } : { client: `c${c}` };
  const headers = { 'X-Forwarded-For': clientIp(data.run, c) };
  if (plan) headers[KEY_HEADER] = apiKey(data.run, c);
  const res = http.get(`${base}${PATH}`, {
    headers,
    timeout: `${TIMEOUT}s`,
    responseCallback: http.expectedStatuses({ min: 200, max: 299 }, 429),
  });
  switch (kind(res)) {
    case 'allowed':
      allowed.add(1, tags);
      rateHeadersOk(res, RULES);
      if (plan) {
        const listed = (parseItems(header(res, 'RateLimit-Policy')) || []).map((p) => p.name);
        check(res, {
          "allowed: every policy of the client's plan is listed": () =>
            plan.rules.every((r) => listed.includes(r.name)),
        });
      }
      break;
    case 'limited':
      limited.add(1, tags);
      limitedOk(res, RULES);
      break;
    default:
      errors.add(1, tags);
      note(`unexpected answer: ${res.status} ${res.error || ''} ${res.body}`);
  }
}
