// llm-tokens.js: a daily token budget per API key, charged by what each
// answer says it used (see docs/configuration.md, "Token budgets for an LLM
// API"). Each client reserves X-Max-Tokens (a random 1..MAX_COST) and the
// upstream reports X-Usage: the X-Use the client asked it to report (at
// most its reservation, as a model capped by max_tokens). Spread over every
// node of BASE_URL, each client's used tokens of admitted requests stay
// within its budget, and it gets most of it:
//
//   used <= TOKEN_QUOTA                     (never more than the budget)
//   used >= MIN_RATIO x TOKEN_QUOTA         (the budget is really spent)
//
// Every 429 names the rule with Retry-After and the problem body.
//
// Environment:
//   BASE_URL     gateway URL, or a comma-separated list of nodes
//   DURATION     how long to send (default 20s)
//   CLIENTS      API keys (default 10)
//   CLIENT_RATE  requests/s each client sends (default 20)
//   TOKEN_QUOTA  tokens per key per day (default 20000)
//   MAX_COST     the most one request may reserve (default 2000)
//   MIN_RATIO    lower bound as a share of the budget (default 0.8)
//   RUN_ID       pins the key names (default random)

import { check } from 'k6';
import http from 'k6/http';
import exec from 'k6/execution';
import { Counter } from 'k6/metrics';
import { env, header, kind, nodes, num, runId, seconds } from './lib/common.js';

const DURATION = env('DURATION', '20s');
const CLIENTS = num('CLIENTS', 10);
const CLIENT_RATE = num('CLIENT_RATE', 20);
const QUOTA = num('TOKEN_QUOTA', 20000);
const MAX_COST = num('MAX_COST', 2000);
const MIN_RATIO = num('MIN_RATIO', 0.8);
const NODES = nodes();

const used = new Counter('used_tokens');
const limited = new Counter('limited');
const errors = new Counter('errors');

const thresholds = {
  checks: ['rate==1'],
  errors: ['count==0'],
  limited: ['count>0'],
};
for (let c = 0; c < CLIENTS; c++) {
  thresholds[`used_tokens{client:c${c}}`] = [
    `count<=${QUOTA}`,
    `count>=${Math.floor(MIN_RATIO * QUOTA)}`,
  ];
}

export const options = {
  scenarios: {
    tokens: {
      executor: 'constant-arrival-rate',
      rate: CLIENTS * CLIENT_RATE,
      timeUnit: '1s',
      duration: DURATION,
      preAllocatedVUs: Math.max(10, CLIENTS * 2),
      maxVUs: Math.max(50, CLIENTS * 4),
    },
  },
  thresholds,
};

export function setup() {
  return { run: runId() };
}

export default function (data) {
  const i = exec.scenario.iterationInTest;
  const c = i % CLIENTS;
  const base = NODES[i % NODES.length];
  const reserve = 1 + Math.floor(Math.random() * MAX_COST);
  const use = Math.floor(Math.random() * (reserve + 1));
  const res = http.post(`${base}/v1/chat`, '{}', {
    headers: {
      'X-Api-Key': `lt-${data.run}-c${c}`,
      'X-Max-Tokens': String(reserve),
      'X-Use': String(use),
      'Content-Type': 'application/json',
    },
    timeout: '5s',
    tags: { client: `c${c}` },
  });
  const tags = { client: `c${c}` };
  switch (kind(res)) {
    case 'allowed':
      used.add(Number(header(res, 'X-Usage')), tags);
      check(res, { 'the answer reports its usage': (r) => header(r, 'X-Usage') === String(use) });
      break;
    case 'limited':
      limited.add(1, tags);
      check(res, {
        '429 names llm-tokens': (r) => (r.body || '').includes('llm-tokens'),
        '429 has Retry-After': (r) => Number(header(r, 'Retry-After')) >= 1,
      });
      break;
    default:
      errors.add(1, tags);
  }
}
