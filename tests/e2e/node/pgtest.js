// Runtimes for the Node.js loader's end-to-end tests (tests/e2e/node_rt.rs).
const ffi = require('polygate_ffi');

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

exports.echo = (cfg, tq) => ffi.serve(tq, (req) => req);
exports.tagged = (cfg, tq) => ffi.serve(tq, (req) => `${cfg}:${req}`);
exports.async = (cfg, tq) => ffi.serve(tq, async (req) => {
  await sleep(req.length % 5);
  return Buffer.concat([Buffer.from('async:'), req]);
});
exports.slow = (cfg, tq) => ffi.serve(tq, async (req) => {
  ffi.log(1, `slow handler started ${req}`);
  await sleep(500);
  return `slow:${req}`;
});
exports.rc = (cfg, tq) => ffi.serve(tq, async () => ({ rc: 5, body: 'five' }));
exports.json = (cfg, tq) => ffi.serve(tq, (req) => ({ len: req.length, ok: true }));
exports.raise = (cfg, tq) => ffi.serve(tq, (req) => { throw new TypeError(`bad request ${req}`); });
exports.reject = (cfg, tq) => ffi.serve(tq, async (req) => { throw new RangeError(`async ${req}`); });
exports.fail = () => 3;
exports.boom = () => { throw new Error('init exploded'); };
exports.task = (cfg, tq) => ffi.serve(tq, (req, task) => `${task.remainingMs() > 0} ${task.isCancelled()} ${req}`);
exports.gc = (cfg, tq) => ffi.serve(tq, (req) => {
  const junk = [];
  for (let i = 0; i < 2000; i++) junk.push({ i, s: String(i).repeat(4) });
  return `${req}:${junk.length}`;
});
