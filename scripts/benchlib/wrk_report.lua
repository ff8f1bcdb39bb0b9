-- Loaded into wrk with -s. Two jobs:
-- 1. With BENCH_TARGETS="ip:port,ip:port,..." in the environment, thread i connects to target i (modulo):
--    client-side spreading over several backends without any proxy (the direct-3 path).
-- 2. Prints wrk's exact totals and latency percentiles as one JSON line (wrk's text report rounds them).
local targets = os.getenv("BENCH_TARGETS")
local assigned = 0

if targets and targets ~= "" then
  function setup(thread)
    local list = {}
    for host, port in string.gmatch(targets, "([^,:]+):(%d+)") do
      table.insert(list, {host, port})
    end
    local pick = list[assigned % #list + 1]
    thread.addr = wrk.lookup(pick[1], pick[2])[1]
    assigned = assigned + 1
  end
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect_errors": %d, "read_errors": %d, ' ..
    '"write_errors": %d, "status_errors": %d, "timeouts": %d, "lat_mean_us": %.1f, "lat_p50_us": %d, ' ..
    '"lat_p90_us": %d, "lat_p99_us": %d, "lat_max_us": %d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
