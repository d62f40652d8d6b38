-- wrk script for bench/path.py: POST one prebuilt body again and again over keep-alive connections,
-- and count the answers that complete inside a window [BENCH_T1, BENCH_T2] of CLOCK_MONOTONIC
-- seconds (the clock of Python's time.monotonic()), the window in which the bench reads the
-- server's CPU time. The body, its Content-Type and the window come in environment variables.
local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("BENCH_CTYPE")

local t1, t2 = tonumber(os.getenv("BENCH_T1")), tonumber(os.getenv("BENCH_T2"))
ok, bad = 0, 0 -- globals: done() reads them from every thread with thread:get()

function response(status, headers, body)
  local t = now()
  if t >= t1 and t <= t2 then
    if status == 200 then ok = ok + 1 else bad = bad + 1 end
  end
end

local threads = {}
function setup(thread) table.insert(threads, thread) end

function done(summary, latency, requests)
  local n_ok, n_bad = 0, 0
  for _, t in ipairs(threads) do
    n_ok = n_ok + t:get("ok")
    n_bad = n_bad + t:get("bad")
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"ok": %d, "bad": %d, "all_requests": %d, "socket_errors": %d, "p50_us": %d, "p95_us": %d}\n',
    n_ok, n_bad, summary.requests, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(95)))
end
