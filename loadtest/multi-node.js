// multi-node.js: the same traffic spread over several gateway nodes keeps
// the limits that one node would: buckets live in the shared Redis, so N
// nodes never allow N times the limit.
//
// CLIENTS synthetic clients each send CLIENT_RATE requests/s for DURATION;
// each client's requests go round robin over every node of BASE_URL. The
// gateways are expected to enforce a per-client rule (RULE_*) and one
// `key = "global"` rule (GLOBAL_*) shared by everybody. Thresholds hold
//
//   all allowed          <= GLOBAL_BURST + global rate x (DURATION + TIMEOUT) + 1
//   all allowed          >= MIN_RATIO x min(offered, GLOBAL_BURST + global rate x DURATION)
//   each client allowed  <= RULE_BURST + rule rate x (DURATION + TIMEOUT) + 1
//   each node            answered some allowed requests and some 429s
//
// With node-local buckets the first bound fails by a factor of the node
// count. Set GLOBAL_RATE=0 to check the per-client rule alone (then the
// lower bound applies to each client instead).
//
// Environment:
//   BASE_URL      comma-separated gateway nodes (at least 2)
//   URL_PATH      request path (default /)
//   DURATION      how long to send (default 30s)
//   CLIENTS       distinct clients (default 20)
//   CLIENT_RATE   requests/s each client sends (default 10)
//   RULE_NAME, RULE_RATE, RULE_PER, RULE_BURST
//                 the per-client rule (default per-ip, 5 per 1s, burst 10)
//   GLOBAL_NAME, GLOBAL_RATE, GLOBAL_PER, GLOBAL_BURST
//                 the global rule (default global, 50 per 1s, burst 100)
//   MIN_RATIO     lower bound as a share of what the bucket allows (default 0.8)
//   TIMEOUT       request timeout, seconds (default 2)
//   RUN_ID        pins the synthetic address block (0..127; default random)
//
// Bans should be off (or ban.after high) on the gateways under test.

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
const GLOBAL = ruleFromEnv('GLOBAL', { name: 'global', rate: 50, per: '1s', burst: 100 });
const HAS_GLOBAL = GLOBAL.rate > 0;
const RULES = HAS_GLOBAL ? { [RULE.name]: RULE, [GLOBAL.name]: GLOBAL } : { [RULE.name]: RULE };
const PATH = env('URL_PATH', '/');
const DURATION = env('DURATION', '30s');
const D = seconds(DURATION);
const CLIENTS = num('CLIENTS', 20);
const CLIENT_RATE = num('CLIENT_RATE', 10);
const TIMEOUT = num('TIMEOUT', 2);
const MIN_RATIO = num('MIN_RATIO', 0.8);
const NODES = nodes();

if (NODES.length < 2) throw new Error('multi-node.js needs BASE_URL with at least 2 nodes');

const CLIENT_UPPER = bucketBound(RULE, D + TIMEOUT);
const offered = CLIENTS * CLIENT_RATE * D;
const GLOBAL_UPPER = HAS_GLOBAL ? bucketBound(GLOBAL, D + TIMEOUT) : CLIENTS * CLIENT_UPPER;
const GLOBAL_LOWER = HAS_GLOBAL
  ? Math.floor(MIN_RATIO * Math.min(offered, GLOBAL.burst + GLOBAL.perSecond * D))
  : 0;
const CLIENT_LOWER = HAS_GLOBAL
  ? 0
  : Math.floor(MIN_RATIO * Math.min(CLIENT_RATE * D, RULE.burst + RULE.perSecond * D));

const allowed = new Counter('allowed');
const limited = new Counter('limited');
const errors = new Counter('errors');

const thresholds = {
  checks: ['rate==1'],
  errors: ['count==0'],
  allowed: [`count<=${GLOBAL_UPPER}`, `count>=${GLOBAL_LOWER}`],
  limited: ['count>0'],
  dropped_iterations: [`count<=${Math.ceil(CLIENTS * CLIENT_RATE * 0.01)}`],
};
for (let c = 0; c < CLIENTS; c++) {
  thresholds[`allowed{client:c${c}}`] = [`count<=${CLIENT_UPPER}`, `count>=${CLIENT_LOWER}`];
}
for (let n = 0; n < NODES.length; n++) {
  thresholds[`allowed{node:n${n}}`] = ['count>0'];
  thresholds[`limited{node:n${n}}`] = ['count>0'];
}

export const options = {
  scenarios: {
    spread: {
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
    `${CLIENTS} clients x ${CLIENT_RATE}/s over ${NODES.length} nodes for ${D}s; ` +
      `allowed in all between ${GLOBAL_LOWER} and ${GLOBAL_UPPER}, per client at most ${CLIENT_UPPER}`,
  );
  return { run: runId() };
}

export default function (data) {
  const i = exec.scenario.iterationInTest;
  const c = i % CLIENTS;
  const n = Math.floor(i / CLIENTS) % NODES.length;
  const res = http.get(`${NODES[n]}${PATH}`, {
    headers: { 'X-Forwarded-For': clientIp(data.run, c) },
    timeout: `${TIMEOUT}s`,
    responseCallback: http.expectedStatuses({ min: 200, max: 299 }, 429),
    tags: { node: `n${n}` },
  });
  const tags = { client: `c${c}`, node: `n${n}` };
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
