// The smallest Node.js runtime: answers each request with its own bytes.
//   ngx.load_ffi("ffi_nodejs", "./examples/node/echo.js,init")
const ffi = require('polygate_ffi');

exports.init = (cfg, tq) => ffi.serve(tq, async (req) => req);

// An empty answer for the ffi plugin (continue unchanged): the cheapest plugin round trip.
exports.continue_ = (cfg, tq) => ffi.serve(tq, () => null);
