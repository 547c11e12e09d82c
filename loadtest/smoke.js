// smoke.js: one fresh client per gateway node is allowed, then limited,
// and every answer has the documented headers and bodies.
//
// Per node: send requests until the first 429 (at most MAX_REQUESTS);
// every allowed answer carries the five RateLimit headers for the
// configured rule, with `remaining` counting down; the client is allowed at
// least RULE_BURST and at most the token-bucket bound before it is limited;
// the 429 has Retry-After, the RateLimit headers and the JSON body; after
// waiting Retry-After seconds (when at most MAX_WAIT) it is allowed again.
//
// Environment:
//   BASE_URL      gateway URL, or a comma-separated list of nodes
//                 (default http://127.0.0.1:8080)
//   URL_PATH      request path (default /)
//   RULE_NAME     name of the rule that limits the client (default per-ip)
//   RULE_RATE     its `rate` (default 100)
//   RULE_PER      its `per` (default 1s)
//   RULE_BURST    its `burst` (default 200)
//   MAX_REQUESTS  give up looking for a 429 after this many (default
//                 10 x burst + 100)
//   MAX_WAIT      longest Retry-After to wait out, seconds (default 5)
//   RUN_ID        pins the synthetic address block (0..127; default random)
//   DURATION      accepted for symmetry; the smoke test runs one pass
//   INSECURE_TLS  1: accept any certificate on https:// nodes (a self-signed
//                 or test certificate); default 0, the certificate must verify
//   EXPECT_PROTO  when set, every answer must use this protocol, as k6 names
//                 it (HTTP/2.0 or HTTP/1.1); https:// nodes negotiate HTTP/2
//
// HTTPS: give https:// URLs in BASE_URL, e.g.
//   k6 run -e BASE_URL=https://127.0.0.1:8443 -e INSECURE_TLS=1 \
//          -e EXPECT_PROTO=HTTP/2.0 loadtest/smoke.js
//
// The client identity is set with X-Forwarded-For, which the gateway only
// honours from a trusted proxy: run k6 from a host in client_ip.trusted_proxies
// (loopback by default). The test client is refused a few times: with the
// default ban settings (20 refusals in 10 s) it is never banned.

import http from 'k6/http';
import { check, sleep } from 'k6';
import { Counter } from 'k6/metrics';
import {
  clientIp,
  env,
  bucketBound,
  header,
  kind,
  limitedOk,
  nodes,
  num,
  rateHeadersOk,
  ruleFromEnv,
  runId,
} from './lib/common.js';

const RULE = ruleFromEnv('RULE', { name: 'per-ip', rate: 100, per: '1s', burst: 200 });
const RULES = { [RULE.name]: RULE };
const PATH = env('URL_PATH', '/');
const MAX_REQUESTS = num('MAX_REQUESTS', RULE.burst * 10 + 100);
const MAX_WAIT = num('MAX_WAIT', 5);

const unexpected = new Counter('unexpected_answers');

const EXPECT_PROTO = env('EXPECT_PROTO', '');

export const options = {
  // Only when asked: a gateway with a self-signed certificate.
  insecureSkipTLSVerify: env('INSECURE_TLS', '0') === '1',
  scenarios: {
    smoke: { executor: 'shared-iterations', vus: 1, iterations: 1, maxDuration: '2m' },
  },
  thresholds: {
    // Every check of every answer passed.
    checks: ['rate==1'],
    // No 5xx, no timeout, no answer that is neither allowed nor limited.
    unexpected_answers: ['count==0'],
  },
};

export function setup() {
  return { run: runId() };
}

export default function (data) {
  nodes().forEach((base, n) => {
    const ip = clientIp(data.run, n);
    const tags = { node: String(n) };
    const params = { headers: { 'X-Forwarded-For': ip }, tags, timeout: '10s' };
    const started = Date.now();
    let allowed = 0;
    let lastRemaining = Infinity;
    let countsDown = true;
    let limited = null;

    for (let i = 0; i < MAX_REQUESTS && limited === null; i++) {
      const res = http.get(`${base}${PATH}`, params);
      if (EXPECT_PROTO !== '') {
        check(res, { [`spoken over ${EXPECT_PROTO}`]: (r) => r.proto === EXPECT_PROTO }, tags);
      }
      const k = kind(res);
      if (k === 'allowed') {
        allowed++;
        const rl = rateHeadersOk(res, RULES, tags);
        // Tokens refill between requests, so remaining may stay level, but
        // at far below the refill rate it never grows past the last value + 1.
        if (rl !== null) {
          if (rl.r > lastRemaining + 1) countsDown = false;
          lastRemaining = rl.r;
        }
        check(res, { 'allowed: RateLimit names the configured rule': () => rl && rl.name === RULE.name }, tags);
      } else if (k === 'limited') {
        limited = res;
      } else {
        unexpected.add(1, tags);
        console.error(`${base}: unexpected answer ${res.status} ${res.error || ''} ${res.body}`);
        return;
      }
    }
    const elapsed = (Date.now() - started) / 1000;

    check(null, {
      'a fresh client is limited in the end': () => limited !== null,
      'remaining counts down': () => countsDown,
      'a fresh client gets at least its burst': () => allowed >= RULE.burst,
      'and no more than the token-bucket bound': () => allowed <= bucketBound(RULE, elapsed),
    }, tags);
    if (limited === null) return;
    console.log(`${base}: ${allowed} allowed in ${elapsed.toFixed(2)}s, then 429`);

    const body = limitedOk(limited, RULES, tags);
    check(limited, {
      'limited: the bucket is empty (r=0)': (r) => header(r, 'RateLimit-Remaining') === '0',
      'limited: rule is the configured one': () => body && body.rule === RULE.name,
    }, tags);

    // Right after a 429 the client stays limited ...
    const again = http.get(`${base}${PATH}`, params);
    check(again, { 'still limited right after': (r) => kind(r) === 'limited' }, tags);

    // ... and Retry-After is honest: once it has passed, one request goes through.
    const wait = Number(header(again, 'Retry-After') || header(limited, 'Retry-After'));
    if (wait <= MAX_WAIT) {
      sleep(wait);
      const after = http.get(`${base}${PATH}`, params);
      check(after, { 'allowed again after Retry-After': (r) => kind(r) === 'allowed' }, tags);
    } else {
      console.warn(`${base}: Retry-After ${wait}s is over MAX_WAIT, not waited out`);
    }
  });
}
