-- The edge under load: public URLs /img/WxH/path, originals drawn from a Zipf law, each
-- connection paced by delay() so that connections / pause ≈ the offered rate.
-- Env:
--   HEATCROP_BENCH_PATHS    file with one original a line (rank 1 first)
--   HEATCROP_BENCH_SIZES    "400x300,300x300,..." : Zipf over originals × sizes (rank order
--                           original-major: rank k is original k mod N, size k div N); or
--                           "unique": Zipf over originals, every request a size never asked
--                           before in the run (a new aspect ratio: box-cache and nginx misses)
--   HEATCROP_BENCH_ZIPF_S   exponent (default 1.0)
--   HEATCROP_BENCH_DELAY_MS pause after each answer, per connection (0: unpaced)
--   HEATCROP_BENCH_THREADS  wrk's -t, so that threads draw disjoint unique sizes
--   HEATCROP_BENCH_SEED     base seed (each thread adds its index): runs draw the same URLs
-- Counts (merged over threads in done(), printed as one HEATCROP_LOAD JSON line): "served:<smart|fallback|legacy|cache-hit>"
-- from X-Heatcrop-Cache: HIT or else X-Heatcrop-Served, "path:<X-Heatcrop-Path>" for misses,
-- "hit:<X-Heatcrop-Served>" for hits, "status:<code>" for anything but 200.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(dir .. "common.lua")

local paths = common.read_paths()
local sizes_env = os.getenv("HEATCROP_BENCH_SIZES") or "400x300"
local zipf_s = tonumber(os.getenv("HEATCROP_BENCH_ZIPF_S") or "1.0")
local pause = tonumber(os.getenv("HEATCROP_BENCH_DELAY_MS") or "0")
local nthreads = tonumber(os.getenv("HEATCROP_BENCH_THREADS") or "1")
local seed = tonumber(os.getenv("HEATCROP_BENCH_SEED") or "20260611")
local unique = sizes_env == "unique"

local sizes = {}
if not unique then
   for s in string.gmatch(sizes_env, "[^,]+") do sizes[#sizes + 1] = s end
end

-- Primes between 400 and 800: with W in 200..799 and W not a multiple of H, no two (W, H)
-- of one original reduce to the same aspect ratio.
local primes = {}
for n = 401, 797, 2 do
   local prime = true
   for d = 3, math.floor(math.sqrt(n)), 2 do
      if n % d == 0 then prime = false; break end
   end
   if prime then primes[#primes + 1] = n end
end

local keys = unique and #paths or #paths * #sizes
local cdf = {}
local total = 0
for k = 1, keys do
   total = total + 1 / (k ^ zipf_s)
   cdf[k] = total
end

local function draw()
   local x = math.random() * total
   local lo, hi = 1, keys
   while lo < hi do
      local mid = math.floor((lo + hi) / 2)
      if cdf[mid] < x then lo = mid + 1 else hi = mid end
   end
   return lo - 1 -- 0-based rank
end

local used = {} -- per original: how many unique sizes this thread has drawn
counts = {}
setup = function(thread)
   thread:set("tid", #common.threads)
   common.setup(thread)
end

function init(args)
   math.randomseed(seed + (tid or 0))
end

local function unique_size(original)
   local c = (used[original] or 0)
   local size
   repeat
      local n = c * nthreads + (tid or 0)
      local h = primes[(n % #primes) + 1]
      local w = 200 + (math.floor(n / #primes) % 600)
      c = c + 1
      if w % h ~= 0 then size = string.format("%dx%d", w, h) end
   until size
   used[original] = c
   return size
end

function request()
   local k = draw()
   local n = #paths
   local original = k % n
   local size
   if unique then
      size = unique_size(original)
   else
      size = sizes[math.floor(k / n) + 1]
   end
   return wrk.format("GET", "/img/" .. size .. "/" .. paths[original + 1])
end

function delay()
   return pause
end

local header = common.header

function response(status, headers, body)
   local key
   if status ~= 200 then
      key = "status:" .. status
   elseif header(headers, "x-heatcrop-cache") == "HIT" then
      key = "served:cache-hit"
      -- What the cached answer was (the cache keeps the inner server's headers): the smart
      -- share counts hits of smart crops too.
      local served = header(headers, "x-heatcrop-served") or "none"
      counts["hit:" .. served] = (counts["hit:" .. served] or 0) + 1
   else
      key = "served:" .. (header(headers, "x-heatcrop-served") or "none")
      local path = header(headers, "x-heatcrop-path")
      if path then counts["path:" .. path] = (counts["path:" .. path] or 0) + 1 end
   end
   counts[key] = (counts[key] or 0) + 1
end

done = common.summary_writer("HEATCROP_LOAD", "counts")
