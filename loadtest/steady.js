// steady.js: a constant arrival rate well under the limits is served
// untouched: no refusal, no error, and a bounded latency.
//
// RATE requests/s for DURATION, spread over CLIENTS synthetic clients
// (round robin, so each client sends RATE/CLIENTS per second) and over every
// node of BASE_URL. The script refuses to start if a client's share is not
// under its RULE_RATE: this test is about the gateway's cost, not its limits.
//
// Environment:
//   BASE_URL     gateway URL, or a comma-separated list of nodes
//                (default http://127.0.0.1:8080)
//   URL_PATH     request path (default /)
//   DURATION     how long to send (default 30s)
//   RATE         requests per second in all (default 100)
//   CLIENTS      distinct clients (X-Forwarded-For) (default 20)
//   RULE_NAME, RULE_RATE, RULE_PER, RULE_BURST
//                the per-client rule the gateway enforces (default per-ip,
//                100 per 1s, burst 200): checked against the headers
//   P95_MS       95th percentile latency bound, ms (default 50)
//   P99_MS       99th percentile latency bound, ms (default 200)
//   VUS          pre-allocated VUs (default RATE / 5, at least 10)
//   RUN_ID       pins the synthetic address block (0..127; default random)

import http from 'k6/http';
import exec from 'k6/execution';
import { check } from 'k6';
import { Counter } from 'k6/metrics';
import {
  clientIp,
  env,
  kind,
  note,
  nodes,
  num,
  rateHeadersOk,
  ruleFromEnv,
  runId,
} from './lib/common.js';

const RULE = ruleFromEnv('RULE', { name: 'per-ip', rate: 100, per: '1s', burst: 200 });
const RULES = { [RULE.name]: RULE };
const PATH = env('URL_PATH', '/');
const DURATION = env('DURATION', '30s');
const RATE = num('RATE', 100);
const CLIENTS = num('CLIENTS', 20);
const NODES = nodes();
const VUS = num('VUS', Math.max(10, Math.ceil(RATE / 5)));

if (RATE / CLIENTS >= RULE.perSecond) {
  throw new Error(
    `RATE/CLIENTS = ${RATE / CLIENTS}/s is not under RULE_RATE (${RULE.perSecond}/s): raise CLIENTS`,
  );
}

const refused = new Counter('refused');
const errors = new Counter('errors');

export const options = {
  scenarios: {
    steady: {
      executor: 'constant-arrival-rate',
      rate: RATE,
      timeUnit: '1s',
      duration: DURATION,
      preAllocatedVUs: VUS,
      maxVUs: VUS * 4,
      gracefulStop: '5s',
    },
  },
  thresholds: {
    // Nobody under the limit is ever refused ...
    refused: ['count==0'],
    // ... nor gets a 5xx, a timeout or a broken answer.
    errors: ['count==0'],
    http_req_failed: ['rate==0'],
    checks: ['rate==1'],
    http_req_duration: [`p(95)<${num('P95_MS', 50)}`, `p(99)<${num('P99_MS', 200)}`],
    // The generator kept up: a slow gateway shows here as skipped iterations.
    dropped_iterations: [`count<=${Math.ceil(RATE * 0.01)}`],
  },
};

export function setup() {
  return { run: runId() };
}

export default function (data) {
  const i = exec.scenario.iterationInTest;
  const client = i % CLIENTS;
  const base = NODES[Math.floor(i / CLIENTS) % NODES.length];
  const res = http.get(`${base}${PATH}`, {
    headers: { 'X-Forwarded-For': clientIp(data.run, client) },
    timeout: '5s',
  });
  const k = kind(res);
  if (k === 'allowed') {
    rateHeadersOk(res, RULES);
    check(res, { 'upstream body came through': (r) => r.body && r.body.length > 0 });
  } else if (k === 'limited' || k === 'banned') {
    refused.add(1);
    note(`refused: ${res.status} ${res.body}`);
  } else {
    errors.add(1);
    note(`error answer: ${res.status} ${res.error || ''} ${String(res.body).slice(0, 200)}`);
  }
}
