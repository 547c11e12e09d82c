// bans.js: abusive clients get banned; well-behaved clients next to them
// are never refused.
//
// ABUSERS clients each send ABUSER_RATE requests/s, far over their limit,
// one request at a time (so each sees its answers in order). Each must be
// banned after BAN_AFTER refusals (BAN_AFTER - 1 limited answers and the
// banning one, or BAN_AFTER limited answers and then the ban), and while
// its ban lasts it is never allowed again and gets the documented ban answer:
// status BAN_STATUS, Retry-After, {"error":"banned","retry_after":N}.
// Meanwhile GOOD_CLIENTS clients send GOOD_RATE requests/s each, under
// their limit: none of them may ever be refused. Requests are spread over
// every node of BASE_URL.
//
// With ADMIN_URL and ADMIN_TOKEN, teardown also checks that every abuser
// and no good client is listed by GET /admin/bans, then lifts the test's
// bans (CLEANUP=0 keeps them).
//
// Environment:
//   BASE_URL      gateway URL, or a comma-separated list of nodes
//                 (default http://127.0.0.1:8080)
//   URL_PATH      request path (default /)
//   DURATION      how long to send (default 30s)
//   ABUSERS       abusive clients (default 5)
//   ABUSER_RATE   requests/s of each abuser (default 50)
//   GOOD_CLIENTS  well-behaved clients (default 10)
//   GOOD_RATE     requests/s of each (default half the rule's rate)
//   RULE_NAME, RULE_RATE, RULE_PER, RULE_BURST
//                 the per-client rule (default per-ip, 5 per 1s, burst 10)
//   BAN_AFTER     the gateway's ban.after (default 20)
//   BAN_STATUS    its ban.status (default 429)
//   BAN_DURATION  its ban.duration, for the Retry-After bound (default 1m)
//   ADMIN_URL, ADMIN_TOKEN   the admin listener and its token (optional)
//   CLEANUP       lift the test's bans in teardown (default 1)
//   RUN_ID        pins the synthetic address block (0..127; default random)
//
// Clients are told apart by X-Forwarded-For: run k6 from a trusted proxy
// address (loopback by default).

import http from 'k6/http';
import exec from 'k6/execution';
import { check, sleep } from 'k6';
import { Counter } from 'k6/metrics';
import {
  bannedOk,
  clientIp,
  env,
  header,
  kind,
  note,
  limitedOk,
  nodes,
  num,
  rateHeadersOk,
  ruleFromEnv,
  runId,
  seconds,
} from './lib/common.js';

const RULE = ruleFromEnv('RULE', { name: 'per-ip', rate: 5, per: '1s', burst: 10 });
const RULES = { [RULE.name]: RULE };
const PATH = env('URL_PATH', '/');
const DURATION = env('DURATION', '30s');
const D = seconds(DURATION);
const ABUSERS = num('ABUSERS', 5);
const ABUSER_RATE = num('ABUSER_RATE', 50);
const GOOD_CLIENTS = num('GOOD_CLIENTS', 10);
const GOOD_RATE = num('GOOD_RATE', RULE.perSecond / 2);
const BAN_AFTER = num('BAN_AFTER', 20);
const BAN_STATUS = num('BAN_STATUS', 429);
const BAN_SECS = seconds(env('BAN_DURATION', '1m'));
const ADMIN_URL = env('ADMIN_URL', '');
const ADMIN_TOKEN = env('ADMIN_TOKEN', '');
const CLEANUP = env('CLEANUP', '1') !== '0';
const NODES = nodes();

// Abusers are clients 0..ABUSERS-1 of the run's block, good clients 512...
const GOOD_BASE = 512;

if (GOOD_RATE >= RULE.perSecond) throw new Error('GOOD_RATE must be under the rule rate');
if (ABUSER_RATE <= RULE.perSecond) throw new Error('ABUSER_RATE must be over the rule rate');

const banned = new Counter('banned');
const allowedWhileBanned = new Counter('allowed_while_banned');
const goodRefused = new Counter('good_refused');
const errors = new Counter('errors');

const thresholds = {
  checks: ['rate==1'],
  errors: ['count==0'],
  good_refused: ['count==0'],
  allowed_while_banned: ['count==0'],
  banned: ['count>0'],
};
for (let a = 0; a < ABUSERS; a++) thresholds[`banned{client:a${a}}`] = ['count>0'];

export const options = {
  scenarios: {
    abusers: {
      // One iteration per abuser, looping for DURATION: each abuser is one
      // sequential stream of requests.
      executor: 'shared-iterations',
      exec: 'abuser',
      vus: ABUSERS,
      iterations: ABUSERS,
      maxDuration: `${D + 15}s`,
    },
    good: {
      executor: 'constant-arrival-rate',
      exec: 'good',
      rate: Math.max(1, Math.round(GOOD_CLIENTS * GOOD_RATE * 100)),
      timeUnit: '100s',
      duration: DURATION,
      preAllocatedVUs: Math.max(5, GOOD_CLIENTS),
      maxVUs: GOOD_CLIENTS * 4,
      gracefulStop: '5s',
    },
  },
  thresholds,
};

function unexpected(res, who) {
  errors.add(1);
  note(`${who}: unexpected answer ${res.status} ${res.error || ''} ${res.body}`);
}

export function setup() {
  return { run: runId() };
}

export function abuser(data) {
  const a = exec.scenario.iterationInTest;
  const ip = clientIp(data.run, a);
  const tags = { client: `a${a}` };
  const started = Date.now();
  let limitedBefore = 0;
  let bannedUntil = 0; // ms since epoch; 0: not banned yet
  let firstBan = true;
  for (let i = 0; Date.now() - started < D * 1000; i++) {
    const res = http.get(`${NODES[i % NODES.length]}${PATH}`, {
      headers: { 'X-Forwarded-For': ip },
      timeout: '5s',
      responseCallback: http.expectedStatuses({ min: 200, max: 299 }, 429, BAN_STATUS),
      tags,
    });
    // A second's slack: Retry-After is rounded up to whole seconds.
    const underBan = Date.now() < bannedUntil - 1000;
    switch (kind(res)) {
      case 'allowed':
        if (underBan) allowedWhileBanned.add(1, tags);
        rateHeadersOk(res, RULES);
        break;
      case 'limited':
        check(res, { 'a banned client gets the ban answer, not 429 rate_limited': () => !underBan });
        if (bannedUntil === 0) limitedBefore++;
        limitedOk(res, RULES);
        break;
      case 'banned': {
        banned.add(1, tags);
        const body = bannedOk(res, BAN_STATUS);
        const secs = Number(header(res, 'Retry-After'));
        if (firstBan) {
          firstBan = false;
          check(null, {
            'banned after ban.after refusals': () =>
              limitedBefore >= BAN_AFTER - 1 && limitedBefore <= BAN_AFTER,
            'first ban lasts at most ban.duration': () => body && secs <= Math.ceil(BAN_SECS) + 1,
          });
          if (limitedBefore < BAN_AFTER - 1 || limitedBefore > BAN_AFTER) {
            console.error(`${ip}: banned after ${limitedBefore} limited answers (ban.after = ${BAN_AFTER})`);
          }
        }
        bannedUntil = Math.max(bannedUntil, Date.now() + secs * 1000);
        break;
      }
      default:
        unexpected(res, ip);
    }
    sleep(1 / ABUSER_RATE);
  }
}

export function good(data) {
  const i = exec.scenario.iterationInTest;
  const c = GOOD_BASE + (i % GOOD_CLIENTS);
  const res = http.get(`${NODES[Math.floor(i / GOOD_CLIENTS) % NODES.length]}${PATH}`, {
    headers: { 'X-Forwarded-For': clientIp(data.run, c) },
    timeout: '5s',
  });
  const k = kind(res);
  if (k === 'allowed') {
    rateHeadersOk(res, RULES);
  } else if (k === 'limited' || k === 'banned') {
    goodRefused.add(1);
    note(`good client refused: ${res.status} ${res.body}`);
  } else {
    unexpected(res, 'good client');
  }
}

export function teardown(data) {
  if (!ADMIN_URL || !ADMIN_TOKEN) return;
  const auth = { headers: { Authorization: `Bearer ${ADMIN_TOKEN}` } };
  const res = http.get(`${ADMIN_URL}/admin/bans`, auth);
  let list = [];
  try {
    list = JSON.parse(res.body);
  } catch (_) {
    list = null;
  }
  const subjects = new Set((list || []).map((b) => b.subject));
  const abusers = [];
  for (let a = 0; a < ABUSERS; a++) abusers.push(clientIp(data.run, a));
  const goods = [];
  for (let g = 0; g < GOOD_CLIENTS; g++) goods.push(clientIp(data.run, GOOD_BASE + g));
  check(res, {
    'admin: GET /admin/bans answers a JSON list': (r) => r.status === 200 && Array.isArray(list),
    'admin: every abuser is listed': () => abusers.every((ip) => subjects.has(ip)),
    'admin: no good client is listed': () => goods.every((ip) => !subjects.has(ip)),
    'admin: the bans are automatic': () =>
      (list || []).filter((b) => abusers.includes(b.subject)).every((b) => b.source === 'auto'),
  });
  if (CLEANUP) {
    for (const ip of abusers) {
      const del = http.del(`${ADMIN_URL}/admin/bans/${encodeURIComponent(ip)}`, null, auth);
      check(del, { 'admin: DELETE /admin/bans/{subject} lifts the ban': (r) => r.status === 204 });
    }
  }
}
