// login.js: only failed logins count (see docs/configuration.md, "Protect a
// login endpoint"). Guessers post wrong passwords to /login as fast as
// CLIENT_RATE allows; users log in with the right one. Spread over every
// node of BASE_URL:
//
//   each guesser's failures (401) <= FAIL_BURST + refill over the run
//   each guesser is refused (429), then banned (BAN_STATUS)
//   no user is ever refused: successes are never counted
//
// Environment:
//   BASE_URL      gateway URL, or a comma-separated list of nodes
//   DURATION      how long to send (default 20s)
//   GUESSERS      clients guessing (default 10)
//   USERS         clients logging in fine (default 10)
//   CLIENT_RATE   requests/s of each client (default 5)
//   FAIL_RATE, FAIL_PER, FAIL_BURST
//                 the login-failures rule (default 5 per 10m, burst 5)
//   BAN_STATUS    the ban's status (default 403)
//   RUN_ID        pins the synthetic address block (0..127; default random)

import { check } from 'k6';
import http from 'k6/http';
import exec from 'k6/execution';
import { Counter } from 'k6/metrics';
import { bucketBound, clientIp, env, nodes, num, ruleFromEnv, runId, seconds } from './lib/common.js';

const DURATION = env('DURATION', '20s');
const D = seconds(DURATION);
const GUESSERS = num('GUESSERS', 10);
const USERS = num('USERS', 10);
const CLIENT_RATE = num('CLIENT_RATE', 5);
const RULE = ruleFromEnv('FAIL', { name: 'login-failures', rate: 5, per: '10m', burst: 5 });
const BAN_STATUS = num('BAN_STATUS', 403);
const NODES = nodes();
const CLIENTS = GUESSERS + USERS;

const failures = new Counter('failures');
const refused = new Counter('refused');
const banned = new Counter('banned');
const users_refused = new Counter('users_refused');
const errors = new Counter('errors');

const thresholds = {
  checks: ['rate==1'],
  errors: ['count==0'],
  users_refused: ['count==0'],
  refused: ['count>0'],
  banned: ['count>0'],
};
for (let g = 0; g < GUESSERS; g++) {
  thresholds[`failures{client:g${g}}`] = [`count<=${bucketBound(RULE, D + 5)}`, `count>=${RULE.burst}`];
}

export const options = {
  scenarios: {
    login: {
      executor: 'constant-arrival-rate',
      rate: CLIENTS * CLIENT_RATE,
      timeUnit: '1s',
      duration: DURATION,
      preAllocatedVUs: Math.max(10, CLIENTS),
      maxVUs: Math.max(50, CLIENTS * 3),
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
  const guesser = c < GUESSERS;
  const name = guesser ? `g${c}` : `u${c - GUESSERS}`;
  const tags = { client: name };
  const res = http.post(`${NODES[i % NODES.length]}/login`, '{}', {
    headers: {
      'X-Forwarded-For': clientIp(data.run, c),
      'X-Password': guesser ? 'guess' : 'right',
      'Content-Type': 'application/json',
    },
    timeout: '5s',
    tags,
  });
  if (!guesser) {
    if (res.status !== 200) users_refused.add(1, tags);
    return;
  }
  if (res.status === 401) failures.add(1, tags);
  else if (res.status === 429) {
    refused.add(1, tags);
    check(res, { '429 names login-failures': (r) => (r.body || '').includes('login-failures') });
  } else if (res.status === BAN_STATUS) banned.add(1, tags);
  else errors.add(1, tags);
}
