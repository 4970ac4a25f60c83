-- Shared by the heatcrop wrk scripts: the list of originals, unique sizes, and a summary
-- line that bench/service.py parses (wrk's own text report is meant for people).

local M = {}

-- Originals, one path a line, from the file named by HEATCROP_BENCH_PATHS.
function M.read_paths()
   local paths = {}
   local name = os.getenv("HEATCROP_BENCH_PATHS")
   if name then
      for line in io.lines(name) do
         if #line > 0 then paths[#paths + 1] = line end
      end
   end
   return paths
end

-- The i-th request (0-based) of a run: original i mod n, width 100..2000 and the run's height,
-- a prime between 1000 and 2000 (aspects 0.05..2). W/p reduces to the same fraction as W'/p'
-- only when p divides W, so skipping W = p leaves no two requests of the run (or of runs with
-- other primes) with the same reduced aspect on one original: every request misses the box
-- cache.
function M.nth_path(paths, height, i)
   local n = #paths
   local k = math.floor(i / n)
   local width = 100 + (k % 1900)
   if width >= height then width = width + 1 end
   return string.format("/crop/%dx%d/%s", width, height, paths[(i % n) + 1])
end

M.threads = {}

function M.setup(thread)
   M.threads[#M.threads + 1] = thread
end

-- A response header by its lower-case name (wrk keeps the server's spelling).
function M.header(headers, want)
   for k, v in pairs(headers) do
      if string.lower(k) == want then return v end
   end
   return nil
end
local header = M.header

-- X-Heatcrop-Path values (and HTTP statuses) counted per thread, merged in done().

function M.count(status, headers)
   local key = header(headers, "x-heatcrop-path") or ("status-" .. status)
   counts[key] = (counts[key] or 0) + 1
end

-- A done() that merges every thread's `counts` and prints one JSON line, "<tag> {...}", with
-- wrk's summary, latency percentiles 50/90/95/99 and the counts under `key`, for the Python
-- side to parse (wrk's own text report is meant for people).
function M.summary_writer(tag, key)
   return function(summary, latency, requests)
      local merged = {}
      for _, t in ipairs(M.threads) do
         local c = t:get("counts")
         if c then
            for k, v in pairs(c) do merged[k] = (merged[k] or 0) + v end
         end
      end
      local parts = {}
      for k, v in pairs(merged) do parts[#parts + 1] = string.format("%q:%d", k, v) end
      local e = summary.errors
      io.write(string.format(
         "%s {\"duration_us\":%d,\"requests\":%d,\"connect\":%d,\"read\":%d," ..
         "\"write\":%d,\"status\":%d,\"timeout\":%d,\"mean_us\":%.1f,\"p50_us\":%d," ..
         "\"p90_us\":%d,\"p95_us\":%d,\"p99_us\":%d,\"max_us\":%d,\"%s\":{%s}}\n",
         tag, summary.duration, summary.requests, e.connect, e.read, e.write, e.status,
         e.timeout, latency.mean, latency:percentile(50), latency:percentile(90),
         latency:percentile(95), latency:percentile(99), latency.max, key,
         table.concat(parts, ",")))
   end
end

M.done = M.summary_writer("HEATCROP_WRK", "paths")

return M
