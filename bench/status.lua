-- wrk script for bench/overload.py: POST one fixed body, count answers by status and the 503s
-- that lack Retry-After, then print one machine-readable line (BENCH_BODY: the body file,
-- BENCH_HEADERS: "name: value" lines).
-- The body and headers are set up as for every bench cell: bench/post.lua, next to this file
-- (its done() is replaced below).
dofile((string.match(debug.getinfo(1, "S").source, "^@(.*/)") or "") .. "post.lua")

local threads = {}

setup = function(thread)
  table.insert(threads, thread)
end

init = function(args)
  statuses = {}
  no_retry_after = 0
end

response = function(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status == 503 and headers["Retry-After"] == nil and headers["retry-after"] == nil then
    no_retry_after = no_retry_after + 1
  end
end

done = function(summary, latency, requests)
  local total, missing = {}, 0
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses")) do
      total[status] = (total[status] or 0) + count
    end
    missing = missing + thread:get("no_retry_after")
  end
  local parts = {}
  for status, count in pairs(total) do
    table.insert(parts, string.format('"%d": %d', status, count))
  end
  local errors = summary.errors
  io.write(string.format(
    'BENCH {"requests": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "timeout": %d, "statuses": {%s}, "no_retry_after": %d}\n',
    summary.requests, latency:percentile(50), latency:percentile(99), latency.max, errors.connect,
    errors.read, errors.write, errors.timeout, table.concat(parts, ", "), missing))
end
