// limits.js: many clients, each well over its limit, are each allowed what
// the token bucket allows, and not more (nor much less).
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
// Every 429 must carry Retry-After, the RateLimit headers and the JSON body.
// Bans should be off (or `ban.after` high) on the gateway under test, or
// clients end up banned and the lower bound fails; MIN_RATIO=0 skips it.
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

import http from 'k6/http';
import exec from 'k6/execution';
import { Counter } from 'k6/metrics';
import {
  bucketBound,
  clientIp,
  env,
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
const CLIENTS = num('CLIENTS', 20);
const CLIENT_RATE = num('CLIENT_RATE', RULE.perSecond * 3);
const TIMEOUT = num('TIMEOUT', 2);
const MIN_RATIO = num('MIN_RATIO', 0.8);
const NODES = nodes();

if (CLIENT_RATE <= RULE.perSecond) {
  throw new Error(`CLIENT_RATE ${CLIENT_RATE}/s is not over the rule's ${RULE.perSecond}/s`);
}

// Bounds per client.
const UPPER = bucketBound(RULE, D + TIMEOUT);
const LOWER = Math.floor(MIN_RATIO * Math.min(CLIENT_RATE * D, RULE.burst + RULE.perSecond * D));

const allowed = new Counter('allowed');
const limited = new Counter('limited');
const errors = new Counter('errors');

const thresholds = {
  checks: ['rate==1'],
  errors: ['count==0'],
  // The clients really were over their limits.
  limited: ['count>0'],
  allowed: [`count<=${UPPER * CLIENTS}`],
  dropped_iterations: [`count<=${Math.ceil(CLIENTS * CLIENT_RATE * 0.01)}`],
};
for (let c = 0; c < CLIENTS; c++) {
  thresholds[`allowed{client:c${c}}`] = [`count<=${UPPER}`, `count>=${LOWER}`];
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

export function setup() {
  console.log(
    `${CLIENTS} clients x ${CLIENT_RATE}/s for ${D}s; each allowed between ${LOWER} and ${UPPER}`,
  );
  return { run: runId() };
}

export default function (data) {
  const i = exec.scenario.iterationInTest;
  const c = i % CLIENTS;
  const base = NODES[Math.floor(i / CLIENTS) % NODES.length];
  const tags = { client: `c${c}` };
  const res = http.get(`${base}${PATH}`, {
    headers: { 'X-Forwarded-For': clientIp(data.run, c) },
    timeout: `${TIMEOUT}s`,
    responseCallback: http.expectedStatuses({ min: 200, max: 299 }, 429),
  });
  switch (kind(res)) {
    case 'allowed':
      allowed.add(1, tags);
      rateHeadersOk(res, RULES);
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
