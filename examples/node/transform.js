// An `ffi` plugin that fetches the upstream's JSON answer with Node's http module and reshapes
// it before the client sees it: fields dropped, fields renamed, a marker added.
//
//   plugins:
//     ffi:
//       lib: ffi_nodejs
//       cfg: './examples/node/transform.js,init,{"upstream": "http://127.0.0.1:9081", "drop": ["headers"], "rename": {"uri": "path"}}'
//
// cfg's third field is JSON: upstream (base URL), drop (field names), rename (old -> new).
const http = require('http');
const ffi = require('polygate_ffi');

function fetchJson(url, headers, agent) {
  return new Promise((resolve, reject) => {
    const req = http.get(url, { headers, agent, timeout: 3000 }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        try {
          resolve({ status: res.statusCode, json: JSON.parse(text) });
        } catch (e) {
          reject(new Error(`upstream answered ${res.statusCode} with non-JSON: ${text.slice(0, 200)}`));
        }
      });
    });
    req.on('timeout', () => req.destroy(new Error('upstream timed out')));
    req.on('error', reject);
  });
}

exports.init = (cfg, tq) => {
  const conf = JSON.parse(cfg);
  const drop = new Set(conf.drop || []);
  const rename = conf.rename || {};
  const agent = new http.Agent({ keepAlive: true });
  return ffi.serve(tq, async (req) => {
    const doc = JSON.parse(req.toString('utf8'));
    let upstream;
    try {
      upstream = await fetchJson(conf.upstream + doc.uri, { 'x-forwarded-by': 'polygate-node' }, agent);
    } catch (e) {
      return { action: 'respond', status: 502, headers: { 'content-type': 'application/json' },
               body: JSON.stringify({ error_msg: String(e.message) }) + '\n' };
    }
    const out = {};
    for (const [k, v] of Object.entries(upstream.json)) {
      if (drop.has(k)) continue;
      out[rename[k] || k] = v;
    }
    out.transformed_by = 'node';
    return {
      action: 'respond',
      status: upstream.status,
      headers: { 'content-type': 'application/json', 'x-transformed-by': 'node' },
      body: JSON.stringify(out) + '\n',
    };
  });
};
